"""The httpx-backed transport for the hosted API (TLS over the internet) and control-plane calls, where its
milliseconds of CPU don't matter; same interface, timeouts and error mapping as backends/transport.py."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import httpx

from backends.errors import (
    BackendError,
    BackendFirstByteTimeoutError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnavailableError,
)


def map_httpx_error(exc: httpx.HTTPError, *, backend: str, in_body: bool = False) -> BackendError:
    """Most specific first. A network error inside the body is a broken response, not an unreachable backend."""
    name = type(exc).__name__  # never str(exc): it may carry the URL
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeoutError(f"timeout ({name})", backend=backend)
    if isinstance(exc, httpx.ConnectError) or (isinstance(exc, httpx.NetworkError) and not in_body):
        return BackendUnavailableError(f"connection failed ({name})", backend=backend)
    return BackendProtocolError(f"bad response ({name})", backend=backend)


class HttpxResponse:
    """The UpstreamResponse duck type over a streamed httpx response: the first-byte deadline runs on until
    the first event (`read()`: the first piece; a stream's consumer: `first_event_received()`)."""

    __slots__ = ("status", "headers", "_response", "_idle_timeout_s", "_backend", "_deadline", "_first_byte_s",
                 "_first_pending")

    def __init__(self, response: httpx.Response, idle_timeout_s: float, backend: str, deadline: float,
                 first_byte_timeout_s: float) -> None:
        self.status = response.status_code
        self.headers: dict[str, str] = {}
        for name, value in response.headers.multi_items():
            key = name.lower()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        self._response = response
        self._idle_timeout_s = idle_timeout_s
        self._backend = backend
        self._deadline = deadline
        self._first_byte_s = first_byte_timeout_s
        self._first_pending = True

    async def read(self) -> bytes:
        parts = []
        async for piece in self.iter_bytes():
            parts.append(piece)
            self._first_pending = False
        return b"".join(parts)

    def first_event_received(self) -> None:
        self._first_pending = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Decoded body pieces as they arrive; each wait is bounded by what is left of the first-byte
        deadline until the first event, by the idle timeout after it."""
        pieces = self._response.aiter_bytes()
        try:
            while True:
                first = self._first_pending
                try:
                    async with asyncio.timeout_at(self._deadline) if first else asyncio.timeout(self._idle_timeout_s):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    if first:
                        message = f"first byte timeout ({self._first_byte_s}s)"
                        raise BackendFirstByteTimeoutError(message, backend=self._backend) from exc
                    message = f"idle timeout ({self._idle_timeout_s}s)"
                    raise BackendTimeoutError(message, backend=self._backend) from exc
                except httpx.HTTPError as exc:
                    raise map_httpx_error(exc, backend=self._backend, in_body=True) from exc
                yield piece
        finally:
            await pieces.aclose()
            await self._response.aclose()

    async def aclose(self) -> None:
        """httpx pools the connection if the body was read to its end and closes it otherwise."""
        await self._response.aclose()


class HttpxTransport:
    """One httpx.AsyncClient for one base URL. httpx has a single read timeout, so it is set to the larger
    of the two and each phase is bounded on top of it."""

    def __init__(
        self, base_url: str, *, connect_timeout_s: float = 5.0, first_byte_timeout_s: float = 300.0,
        idle_timeout_s: float = 300.0, health_timeout_s: float = 25.0, default_headers: Mapping[str, str] | None = None,
        backend: str = "", max_connections: int = 100, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        read_timeout_s = max(first_byte_timeout_s, idle_timeout_s)
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=default_headers,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )
        # Health probes get a client of their own: never queued behind data-plane streams in the pool.
        self._probe_client = httpx.AsyncClient(
            base_url=base_url, headers=default_headers, timeout=httpx.Timeout(health_timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1), transport=transport,
        )
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._health_timeout_s = health_timeout_s
        self._backend = backend

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> HttpxResponse:
        headers = dict(headers or {})
        if body and "content-type" not in self._client.headers and not _has(headers, "content-type"):
            headers["Content-Type"] = "application/json"
        request = self._client.build_request(method, path, content=body, headers=headers)
        deadline = asyncio.get_running_loop().time() + self._first_byte_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._client.send(request, stream=True)
        except TimeoutError as exc:
            message = f"first byte timeout ({self._first_byte_timeout_s}s)"
            raise BackendFirstByteTimeoutError(message, backend=self._backend) from exc
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, backend=self._backend) from exc
        return HttpxResponse(response, self._idle_timeout_s, self._backend, deadline, self._first_byte_timeout_s)

    async def probe(self, path: str, headers: Mapping[str, str] | None = None) -> int:
        """GET `path` on the probe client, the whole exchange bounded by the health timeout: the status."""
        try:
            async with asyncio.timeout(self._health_timeout_s):
                response = await self._probe_client.get(path, headers=headers)
        except TimeoutError as exc:
            raise BackendTimeoutError(f"health timeout ({self._health_timeout_s}s)", backend=self._backend) from exc
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, backend=self._backend) from exc
        return response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._probe_client.aclose()


def _has(headers: Mapping[str, str], name: str) -> bool:
    return any(key.lower() == name for key in headers)

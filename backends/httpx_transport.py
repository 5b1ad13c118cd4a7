"""The httpx-backed transport for the hosted API (TLS over the internet) and control-plane calls, where its
milliseconds of CPU don't matter; same interface and error mapping as backends/transport.py."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import httpx

from backends.errors import BackendError, BackendProtocolError, BackendTimeoutError, BackendUnavailableError


def map_httpx_error(exc: httpx.HTTPError, *, backend: str, in_body: bool = False) -> BackendError:
    """Most specific first. A network error inside the body is a broken response, not an unreachable backend."""
    name = type(exc).__name__  # never str(exc): it may carry the URL
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeoutError(f"timeout ({name})", backend=backend)
    if isinstance(exc, httpx.ConnectError) or (isinstance(exc, httpx.NetworkError) and not in_body):
        return BackendUnavailableError(f"connection failed ({name})", backend=backend)
    return BackendProtocolError(f"bad response ({name})", backend=backend)


class HttpxResponse:
    """The UpstreamResponse duck type over a streamed httpx response."""

    __slots__ = ("status", "headers", "_response", "_idle_timeout_s", "_backend")

    def __init__(self, response: httpx.Response, idle_timeout_s: float, backend: str) -> None:
        self.status = response.status_code
        self.headers: dict[str, str] = {}
        for name, value in response.headers.multi_items():
            key = name.lower()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        self._response = response
        self._idle_timeout_s = idle_timeout_s
        self._backend = backend

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_bytes()])

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Decoded body pieces as they arrive; each wait is bounded by the idle timeout."""
        pieces = self._response.aiter_bytes()
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout_s):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
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
        idle_timeout_s: float = 300.0, default_headers: Mapping[str, str] | None = None, backend: str = "",
        max_connections: int = 100, transport: httpx.AsyncBaseTransport | None = None,
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
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._backend = backend

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> HttpxResponse:
        headers = dict(headers or {})
        if body and "content-type" not in self._client.headers and not _has(headers, "content-type"):
            headers["Content-Type"] = "application/json"
        request = self._client.build_request(method, path, content=body, headers=headers)
        try:
            async with asyncio.timeout(self._first_byte_timeout_s):
                response = await self._client.send(request, stream=True)
        except TimeoutError as exc:
            message = f"first byte timeout ({self._first_byte_timeout_s}s)"
            raise BackendTimeoutError(message, backend=self._backend) from exc
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc, backend=self._backend) from exc
        return HttpxResponse(response, self._idle_timeout_s, self._backend)

    async def aclose(self) -> None:
        await self._client.aclose()


def _has(headers: Mapping[str, str], name: str) -> bool:
    return any(key.lower() == name for key in headers)

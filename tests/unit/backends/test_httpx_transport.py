"""HttpxTransport against httpx.MockTransport handlers: the UpstreamResponse duck type and the error mapping."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from backends.errors import (
    BackendFirstByteTimeoutError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnavailableError,
)
from backends.httpx_transport import HttpxTransport

GENEROUS_S = 5.0  # only a bound on something that must happen; never a speed assertion


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., HttpxTransport]]:
    opened: list[HttpxTransport] = []

    def make(handler: Callable, base_url: str = "http://backend:8080", **kwargs: object) -> HttpxTransport:
        kwargs.setdefault("backend", "moonshot")
        transport = HttpxTransport(base_url, transport=httpx.MockTransport(handler), **kwargs)
        opened.append(transport)
        return transport

    yield make
    for transport in opened:
        await transport.aclose()


async def test_request_head_status_headers_and_body(make):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers=[("X-Multi", "a"), ("x-multi", "b")], content=b'{"id":1}')

    transport = make(handler, "http://backend:8080/v1", default_headers={"Authorization": "Bearer k", "X-A": "1"})
    response = await transport.request("POST", "/chat/completions", b"{}", {"X-A": "2"})
    assert (response.status, response.headers["x-multi"], await response.read()) == (200, "a, b", b'{"id":1}')
    request = seen[0]
    assert str(request.url) == "http://backend:8080/v1/chat/completions"
    assert request.content == b"{}"
    assert request.headers["content-type"] == "application/json"
    assert (request.headers["authorization"], request.headers["x-a"]) == ("Bearer k", "2")


async def test_caller_content_type_wins_and_bodiless_requests_get_none(make):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    transport = make(handler)
    await (await transport.request("POST", "/x", b"a=1", {"content-type": "text/plain"})).read()
    await (await transport.request("GET", "/y")).read()
    assert seen[0].headers["content-type"] == "text/plain"
    assert "content-type" not in seen[1].headers


async def test_body_pieces_stream_as_they_come(make):
    events = [b'data: {"n":%d}\n\n' % i for i in range(3)]

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    transport = make(lambda request: httpx.Response(200, content=stream()))
    response = await transport.request("POST", "/chat/completions", b"{}")
    assert [piece async for piece in response.iter_bytes()] == events
    await response.aclose()
    await response.aclose()


@pytest.mark.parametrize(
    ("exc_type", "expected"),
    [
        (httpx.ConnectError, BackendUnavailableError),
        (httpx.ReadError, BackendUnavailableError),
        (httpx.ConnectTimeout, BackendTimeoutError),
        (httpx.ReadTimeout, BackendTimeoutError),
        (httpx.PoolTimeout, BackendTimeoutError),
        (httpx.RemoteProtocolError, BackendProtocolError),
    ],
)
async def test_errors_before_the_head_map_by_type(make, exc_type, expected):
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("secret-token in a message", request=request)

    transport = make(handler)
    with pytest.raises(expected) as caught:
        await transport.request("POST", "/x", b"{}")
    assert type(caught.value) is expected
    assert isinstance(caught.value.__cause__, exc_type)
    assert caught.value.backend == "moonshot"
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    ("exc_type", "expected"),
    [(httpx.ReadError, BackendProtocolError), (httpx.RemoteProtocolError, BackendProtocolError),
     (httpx.ReadTimeout, BackendTimeoutError)],
)
async def test_errors_inside_the_body_map_by_type(make, exc_type, expected):
    async def stream() -> AsyncIterator[bytes]:
        yield b"first"
        raise exc_type("broken")

    transport = make(lambda request: httpx.Response(200, content=stream()))
    response = await transport.request("GET", "/stream")
    with pytest.raises(expected) as caught:
        await response.read()
    assert isinstance(caught.value.__cause__, exc_type)


async def test_stall_before_the_head_is_a_first_byte_timeout(make):
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        return httpx.Response(200)

    transport = make(handler, first_byte_timeout_s=0.2)
    with pytest.raises(BackendTimeoutError, match="first byte"):
        await asyncio.wait_for(transport.request("POST", "/x", b"{}"), GENEROUS_S)


async def test_stall_mid_body_is_an_idle_timeout(make):
    async def stream() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(60)
        yield b"never"

    transport = make(lambda request: httpx.Response(200, content=stream()), idle_timeout_s=0.2)
    response = await transport.request("GET", "/stream")
    pieces = response.iter_bytes()
    assert await anext(pieces) == b"first"
    response.first_event_received()
    with pytest.raises(BackendTimeoutError, match="idle"):
        await asyncio.wait_for(anext(pieces), GENEROUS_S)
    await pieces.aclose()


async def test_head_before_the_first_event_leaves_the_first_byte_deadline_running(make):
    async def stream() -> AsyncIterator[bytes]:
        await asyncio.sleep(60)  # the prefill, after the head
        yield b"data: {}\n\n"

    transport = make(lambda request: httpx.Response(200, content=stream()), first_byte_timeout_s=0.3,
                     idle_timeout_s=60)
    response = await transport.request("POST", "/chat/completions", b"{}")
    pieces = response.iter_bytes()
    with pytest.raises(BackendFirstByteTimeoutError) as caught:
        await asyncio.wait_for(anext(pieces), GENEROUS_S)
    assert not caught.value.retryable
    await pieces.aclose()


async def test_probe_uses_its_own_client_and_timeout(make):
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            await asyncio.sleep(60)
        return httpx.Response(200)

    transport = make(handler, max_connections=1, health_timeout_s=0.2)
    assert await transport.probe("/health") == 200
    with pytest.raises(BackendTimeoutError):
        await asyncio.wait_for(transport.probe("/slow"), GENEROUS_S)


async def test_connect_refused_is_unavailable_over_a_real_socket():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = HttpxTransport(f"http://127.0.0.1:{port}", backend="hosted")
    try:
        with pytest.raises(BackendUnavailableError) as caught:
            await transport.request("GET", "/health")
    finally:
        await transport.aclose()
    assert isinstance(caught.value.__cause__, httpx.ConnectError)

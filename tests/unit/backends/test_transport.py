"""LeanTransport against real loopback servers that misbehave on purpose."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import transport as transport_module
from backends.errors import (
    BackendFirstByteTimeoutError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnavailableError,
)
from backends.transport import LeanTransport

GENEROUS_S = 5.0  # only ever a bound on waiting for something that must happen; never a speed assertion


class Conn:
    """The server side of one accepted connection."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests = 0

    async def read_request(self) -> tuple[bytes, dict[str, str], bytes] | None:
        """(request line, lower-cased headers, body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for raw in lines:
            name, _, value = raw.decode().partition(":")
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value  # a repeat stays visible
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        self.requests += 1
        return line, headers, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_eof(self) -> None:
        while await self.reader.read(65536):
            pass


Handler = Callable[["Upstream", Conn], Awaitable[None]]


class Upstream:
    """A loopback HTTP/1.1 server: counts connections, runs `handler` on each, notes each client disconnect."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.disconnected = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._tasks.append(asyncio.current_task())
        try:
            await self.handler(self, Conn(self.connections, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler must end normally: 3.11's start_server logs cancelled ones as errors
        finally:
            self.active -= 1
            writer.close()

    async def next_request(self, conn: Conn) -> bool:
        request = await conn.read_request()
        if request is not None:
            self.requests.append(request)
        return request is not None


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b" % (
        len(body), extra, body)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def serve_ok(up: Upstream, conn: Conn) -> None:
    while await up.next_request(conn):
        await conn.send(ok())


async def eof_then_signal(up: Upstream, conn: Conn) -> None:
    await conn.wait_eof()
    up.disconnected.set()


@pytest.fixture
async def start() -> Callable[..., Awaitable[tuple[Upstream, LeanTransport]]]:
    opened: list[tuple[Upstream, LeanTransport]] = []

    async def start(handler: Handler, **kwargs: object) -> tuple[Upstream, LeanTransport]:
        up = Upstream(handler)
        await up.start()
        kwargs.setdefault("backend", "test")
        kwargs.setdefault("first_byte_timeout_s", GENEROUS_S)  # a broken client fails instead of hanging
        kwargs.setdefault("idle_timeout_s", GENEROUS_S)
        transport = LeanTransport(up.url, **kwargs)
        opened.append((up, transport))
        return up, transport

    yield start
    for up, transport in opened:
        await transport.aclose()
        await up.stop()


# --- bodies -------------------------------------------------------------------------------------------------


async def test_content_length_body_status_and_headers(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(ok(b'{"id":1}', extra=b"X-Multi: a\r\nx-multi: b\r\n"))
        await conn.wait_eof()

    up, transport = await start(handler)
    response = await transport.request("POST", "/v1/chat/completions", b'{"model":"m"}')
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-multi"] == "a, b"
    assert await response.read() == b'{"id":1}'


async def test_request_head_carries_the_transport_headers(start):
    up = Upstream(serve_ok)
    await up.start()
    transport = LeanTransport(
        up.url + "/v1/", default_headers={"Authorization": "Bearer k", "X-A": "1"}, first_byte_timeout_s=GENEROUS_S
    )
    try:
        await (await transport.request("POST", "/chat/completions", b"{}", {"X-A": "2", "X-B": "3"})).read()
        await (await transport.request("GET", "/models")).read()
    finally:
        await transport.aclose()
        await up.stop()
    (line, headers, body), (get_line, get_headers, _) = up.requests
    assert line == b"POST /v1/chat/completions HTTP/1.1"
    assert headers["host"] == up.url.removeprefix("http://")
    assert headers["content-length"] == "2" and body == b"{}"
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "keep-alive"
    assert headers["authorization"] == "Bearer k"
    assert (headers["x-a"], headers["x-b"]) == ("2", "3")
    assert get_line == b"GET /v1/models HTTP/1.1"
    assert "content-length" not in get_headers and "content-type" not in get_headers
    assert get_headers["x-a"] == "1"


async def test_caller_content_type_wins(start):
    up, transport = await start(serve_ok)
    await (await transport.request("POST", "/x", b"a=1", {"content-type": "text/plain"})).read()
    assert up.requests[0][1]["content-type"] == "text/plain"


async def test_line_breaks_in_headers_are_refused(start):
    _, transport = await start(serve_ok)
    with pytest.raises(ValueError):
        await transport.request("GET", "/x", headers={"X-A": "1\r\nX-Injected: 1"})


async def test_chunked_body_arrives_piece_by_piece(start):
    events = [b'data: {"n":%d}\n\n' % i for i in range(3)]
    sent_first = asyncio.Event()
    got_first = asyncio.Event()

    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(CHUNKED_HEAD + b"%x\r\n%b\r\n" % (len(events[0]), events[0]))
        sent_first.set()
        await got_first.wait()  # the client must see the first event before the rest exists
        await conn.send(chunked(events[1:]))
        await conn.wait_eof()

    _, transport = await start(handler)
    response = await transport.request("POST", "/v1/chat/completions", b"{}")
    pieces = []
    async for piece in response.iter_bytes():
        pieces.append(piece)
        got_first.set()
    assert pieces[0] == events[0]
    assert b"".join(pieces) == b"".join(events)


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_and_head_keep_the_connection(start, status):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
        await up.next_request(conn)  # HEAD: announces a length, sends no body
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await serve_ok(up, conn)

    up, transport = await start(handler)
    assert await (await transport.request("GET", "/a")).read() == b""
    head = await transport.request("HEAD", "/b")
    assert (head.headers["content-length"], await head.read()) == ("100", b"")
    assert await (await transport.request("GET", "/c")).read() == b'{"ok":true}'
    assert up.connections == 1


async def test_interim_1xx_head_is_skipped(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + ok(b"done"))
        await conn.wait_eof()

    _, transport = await start(handler)
    response = await transport.request("POST", "/x", b"{}")
    assert (response.status, "x-interim" in response.headers, await response.read()) == (200, False, b"done")


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=3000),
    chunk_cuts=st.lists(st.integers(min_value=0), max_size=12),
    write_cuts=st.lists(st.integers(min_value=0), max_size=12),
    framing=st.sampled_from(["chunked", "content-length", "until-close"]),
    streamed=st.booleans(),
)
def test_any_framing_and_split_round_trips(body, chunk_cuts, write_cuts, framing, streamed):
    if framing == "chunked":
        raw = CHUNKED_HEAD + chunked(split_at(body, chunk_cuts))
    elif framing == "content-length":
        raw = ok(body)
    else:
        raw = b"HTTP/1.1 200 OK\r\n\r\n" + body

    async def handler(up, conn):
        while await up.next_request(conn):
            for piece in split_at(raw, write_cuts):
                await conn.send(piece)
                await asyncio.sleep(0)  # let the client read between writes, so TCP boundaries vary too
                await asyncio.sleep(0)
            if framing == "until-close":
                return

    async def run() -> None:
        up = Upstream(handler)
        await up.start()
        transport = LeanTransport(up.url, first_byte_timeout_s=GENEROUS_S, idle_timeout_s=GENEROUS_S)
        try:
            for _ in range(2):  # the second request checks the connection was left in step
                response = await transport.request("POST", "/x", b"{}")
                received = b"".join([p async for p in response.iter_bytes()]) if streamed else await response.read()
                assert received == body
        finally:
            await transport.aclose()
            await up.stop()
        assert up.connections == (2 if framing == "until-close" else 1)

    asyncio.run(run())


async def test_backpressure_pauses_reading_until_the_consumer_drains(start):
    body = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(CHUNKED_HEAD + chunked([body[i:i + 65536] for i in range(0, len(body), 65536)]))
        await serve_ok(up, conn)

    up, transport = await start(handler)
    response = await transport.request("GET", "/big")
    await asyncio.sleep(0.3)  # the consumer lags; the server keeps writing
    assert response._buffered <= (1 << 20) + (1 << 18)  # high mark + one read, not the 8 MiB sent
    assert await response.read() == body
    assert await (await transport.request("GET", "/after")).read() == b'{"ok":true}'
    assert up.connections == 1  # the paused connection was resumed and pooled


async def test_a_connection_paused_as_its_message_ended_is_pooled_resumed(start, monkeypatch):
    monkeypatch.setattr(transport_module, "_HIGH_WATER_BYTES", 4)  # one small read crosses it and ends the body
    up, transport = await start(serve_ok)
    for _ in range(2):
        assert await (await transport.request("GET", "/x")).read() == b'{"ok":true}'
    assert up.connections == 1


# --- pooling ------------------------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(start):
    up, transport = await start(serve_ok)
    for _ in range(5):
        assert await (await transport.request("POST", "/x", b"{}")).read() == b'{"ok":true}'
    assert up.connections == 1


async def test_connection_close_is_not_reused(start):
    async def handler(up, conn):  # says close but leaves the socket open: the client must not reuse it
        await up.next_request(conn)
        await conn.send(ok(extra=b"Connection: close\r\n"))
        await conn.wait_eof()

    up, transport = await start(handler)
    for _ in range(3):
        assert await (await transport.request("GET", "/x")).read() == b'{"ok":true}'
    assert up.connections == 3


async def test_server_closing_an_idle_connection_is_survived(start):
    closed = asyncio.Event()

    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(ok())
        if conn.index == 1:
            conn.writer.close()
            closed.set()
            return
        await serve_ok(up, conn)

    up, transport = await start(handler)
    assert await (await transport.request("GET", "/a")).read() == b'{"ok":true}'
    await asyncio.wait_for(closed.wait(), GENEROUS_S)
    assert await (await transport.request("GET", "/b")).read() == b'{"ok":true}'
    assert up.connections == 2


async def test_stale_keep_alive_is_retried_once_on_a_fresh_connection(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(ok())
        if conn.index == 1:  # the race: the client reused the connection just as the server dropped it
            await up.next_request(conn)
            return
        await serve_ok(up, conn)

    up, transport = await start(handler)
    assert await (await transport.request("POST", "/a", b"{}")).read() == b'{"ok":true}'
    assert await (await transport.request("POST", "/b", b"{}")).read() == b'{"ok":true}'
    assert up.connections == 2
    assert [line for line, _, _ in up.requests] == [b"POST /a HTTP/1.1", b"POST /b HTTP/1.1", b"POST /b HTTP/1.1"]


async def test_a_failure_on_a_fresh_connection_is_not_retried(start):
    async def handler(up, conn):
        await up.next_request(conn)
        if conn.index == 1:
            await conn.send(ok())
            await up.next_request(conn)  # drop the reused connection; every fresh one is dropped too

    up, transport = await start(handler)
    await (await transport.request("GET", "/a")).read()
    with pytest.raises(BackendUnavailableError) as caught:
        await transport.request("GET", "/b")
    assert caught.value.backend == "test"
    assert up.connections == 2


@pytest.mark.parametrize(
    "partial", [b"HTTP/1.1 200 OK\r\nContent-Len", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"]
)
async def test_no_retry_once_response_bytes_arrived(start, partial):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(ok())
        await up.next_request(conn)
        await conn.send(partial)

    up, transport = await start(handler)
    await (await transport.request("GET", "/a")).read()
    with pytest.raises(BackendProtocolError):
        await (await transport.request("GET", "/b")).read()
    assert up.connections == 1


async def test_pool_never_exceeds_max_connections(start):
    async def handler(up, conn):
        while await up.next_request(conn):
            await asyncio.sleep(0.05)
            await conn.send(ok())

    up, transport = await start(handler, max_connections=2)

    async def one() -> bytes:
        return await (await transport.request("POST", "/x", b"{}")).read()

    assert await asyncio.gather(*(one() for _ in range(5))) == [b'{"ok":true}'] * 5
    assert (up.connections, up.max_active) == (2, 2)


async def test_pool_exhausted_after_waiting_connect_timeout(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(CHUNKED_HEAD)  # holds the only connection
        await conn.wait_eof()

    up, transport = await start(handler, max_connections=1, connect_timeout_s=0.2)
    held = await transport.request("GET", "/stream")
    with pytest.raises(BackendUnavailableError, match="pool exhausted"):
        await asyncio.wait_for(transport.request("GET", "/x"), GENEROUS_S)
    await held.aclose()
    assert up.connections == 1


async def test_closed_transport_refuses_and_closes_idle_connections(start):
    async def handler(up, conn):
        await serve_ok(up, conn)
        up.disconnected.set()

    up, transport = await start(handler)
    await (await transport.request("GET", "/x")).read()
    await transport.aclose()
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)
    with pytest.raises(BackendUnavailableError):
        await transport.request("GET", "/x")


# --- faults -------------------------------------------------------------------------------------------------


async def test_connect_refused_is_unavailable():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = LeanTransport(f"http://127.0.0.1:{port}", backend="llama")
    with pytest.raises(BackendUnavailableError) as caught:
        await transport.request("GET", "/health")
    assert caught.value.backend == "llama"
    await transport.aclose()


async def test_stall_before_the_head_is_a_first_byte_timeout(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await eof_then_signal(up, conn)

    up, transport = await start(handler, first_byte_timeout_s=0.2)
    with pytest.raises(BackendTimeoutError, match="first byte"):
        await asyncio.wait_for(transport.request("POST", "/x", b"{}"), GENEROUS_S)
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)  # the abandoned request was aborted
    assert up.requests and up.connections == 1  # not retried


async def test_stall_mid_body_is_an_idle_timeout(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
        await eof_then_signal(up, conn)

    up, transport = await start(handler, idle_timeout_s=0.2)
    response = await transport.request("GET", "/stream")
    pieces = response.iter_bytes()
    assert await anext(pieces) == b"first"
    response.first_event_received()
    with pytest.raises(BackendTimeoutError, match="idle") as caught:
        await asyncio.wait_for(anext(pieces), GENEROUS_S)
    assert caught.value.retryable  # an idle timeout is not a first-byte one
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)


async def test_head_before_prefill_leaves_the_first_byte_deadline_running(start):
    """SGLang sends a stream's head at once and its first event after prefill: the first-byte timeout
    bounds that wait, however long the idle timeout is."""
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(CHUNKED_HEAD)
        await eof_then_signal(up, conn)

    up, transport = await start(handler, first_byte_timeout_s=0.3, idle_timeout_s=60)
    response = await transport.request("POST", "/v1/chat/completions", b"{}")
    with pytest.raises(BackendFirstByteTimeoutError, match="first byte") as caught:
        await asyncio.wait_for(anext(response.iter_bytes()), GENEROUS_S)
    assert not caught.value.retryable
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)  # the upstream request was aborted


async def test_a_prefill_longer_than_the_idle_timeout_is_fine_within_the_first_byte_timeout(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(CHUNKED_HEAD)
        await asyncio.sleep(0.5)
        await conn.send(b"%x\r\n%b\r\n" % (len(b"data: {}\n\n"), b"data: {}\n\n") + b"0\r\n\r\n")
        await conn.wait_eof()

    _, transport = await start(handler, first_byte_timeout_s=GENEROUS_S, idle_timeout_s=0.2)
    response = await transport.request("POST", "/v1/chat/completions", b"{}")
    assert await asyncio.wait_for(response.read(), GENEROUS_S) == b"data: {}\n\n"


async def test_probe_has_its_own_connection_when_the_pool_is_full(start):
    async def handler(up, conn):
        request = await conn.read_request()
        up.requests.append(request)
        if request[0].startswith(b"GET /health"):
            while request is not None:  # a keep-alive probe connection
                await conn.send(ok(b""))
                request = await conn.read_request()
            return
        await conn.send(CHUNKED_HEAD)  # a slow stream holding its data-plane connection
        await conn.wait_eof()

    up, transport = await start(handler, max_connections=2, connect_timeout_s=0.2)
    held = [await transport.request("POST", "/v1/chat/completions", b"{}") for _ in range(2)]
    with pytest.raises(BackendUnavailableError, match="pool exhausted"):
        await transport.request("GET", "/x")
    assert [await transport.probe("/health") for _ in range(3)] == [200, 200, 200]
    assert up.connections == 3  # two streams, one probe connection kept alive
    for response in held:
        await response.aclose()


async def test_probe_is_bounded_by_the_health_timeout(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await eof_then_signal(up, conn)

    up, transport = await start(handler, health_timeout_s=0.2)
    with pytest.raises(BackendTimeoutError, match="health timeout"):
        await asyncio.wait_for(transport.probe("/health"), GENEROUS_S)
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", CHUNKED_HEAD + b"zz\r\nnot a chunk\r\n"])
async def test_garbage_is_a_protocol_error(start, garbage):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(garbage)
        await conn.wait_eof()

    _, transport = await start(handler)
    with pytest.raises(BackendProtocolError, match="malformed"):
        await (await transport.request("GET", "/x")).read()


@pytest.mark.parametrize(
    "partial", [CHUNKED_HEAD + b"5\r\nfirst\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]
)
async def test_close_mid_body_is_a_protocol_error(start, partial):
    async def handler(up, conn):
        await up.next_request(conn)
        await conn.send(partial)

    _, transport = await start(handler)
    response = await transport.request("GET", "/x")
    with pytest.raises(BackendProtocolError, match="body ended"):
        await response.read()


# --- hang-ups -----------------------------------------------------------------------------------------------


async def stream_forever(up: Upstream, conn: Conn) -> None:
    await up.next_request(conn)
    await conn.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
    await eof_then_signal(up, conn)


async def test_cancelling_the_consumer_aborts_the_upstream(start):
    up, transport = await start(stream_forever)
    got_first = asyncio.Event()

    async def consume() -> None:
        response = await transport.request("POST", "/v1/chat/completions", b"{}")
        async for _ in response.iter_bytes():
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), GENEROUS_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)


async def test_cancelling_while_waiting_for_the_head_aborts_the_upstream(start):
    async def handler(up, conn):
        await up.next_request(conn)
        await eof_then_signal(up, conn)

    up, transport = await start(handler)
    task = asyncio.create_task(transport.request("POST", "/x", b"{}"))
    while not up.requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)


async def test_aclose_before_the_end_aborts_and_is_idempotent(start):
    up, transport = await start(stream_forever)
    response = await transport.request("GET", "/stream")
    async for piece in response.iter_bytes():
        assert piece == b"first"
        break
    await response.aclose()
    await response.aclose()
    await asyncio.wait_for(up.disconnected.wait(), GENEROUS_S)
    with pytest.raises(BackendProtocolError):
        await response.read()


# --- connections checked ahead of the requests (llama-server: a new connection per stream) ------------------

def checking_server(events: list[tuple[str, int]]) -> Handler:
    """Answers the check (GET /lora-adapters) on any connection and closes the connection after each other
    response, as llama-server does after a streamed one (saying so here, so the test knows when it is gone)."""

    async def serve(up: Upstream, conn: Conn) -> None:
        while await up.next_request(conn):
            if up.requests[-1][0].startswith(b"GET /lora-adapters"):
                events.append(("check", conn.index))
                await conn.send(ok(b"[]"))
            else:
                events.append(("post", conn.index))
                await conn.send(CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                                + chunked([b"data: x\n\n"]))
                return
    return serve


def with_check(transport: LeanTransport, ready: int, seen: list[int] | None = None) -> None:
    transport.check_path = "/lora-adapters"
    transport.connection_check = lambda status, body: (seen.append(status) if seen is not None else None)
    transport.ready_checked = ready


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(GENEROUS_S):
        while not condition():
            await asyncio.sleep(0.005)


async def test_connections_are_checked_ahead_of_the_requests_that_take_them(start):
    events: list[tuple[str, int]] = []
    up, transport = await start(checking_server(events))
    seen: list[int] = []
    with_check(transport, ready=2, seen=seen)
    for k in range(6):
        if k:
            await until(lambda: not transport._readying and transport._pool.idle_checked(1) >= 1)
        events.append(("request", k))
        response = await transport.request("POST", "/v1/chat/completions", b"{}")
        assert await response.read() == b"data: x\n\n"
    first = events.index(("request", 0))
    assert events[first + 1][0] == "check"  # nothing was ready for the first: it checked its own connection
    for k in range(1, 6):
        begun = events.index(("request", k))
        post = next(event for event in events[begun:] if event[0] == "post")
        assert ("check", post[1]) in events[:begun], (k, events)  # its connection was checked before it began
    assert all(status == 200 for status in seen)
    assert up.max_active <= 1 + 2  # the request's connection and at most `ready_checked` more


async def test_readied_connections_never_take_a_slot_beyond_max_connections(start):
    events: list[tuple[str, int]] = []
    up, transport = await start(checking_server(events), max_connections=1)
    with_check(transport, ready=4)
    for _ in range(4):
        response = await transport.request("POST", "/v1/chat/completions", b"{}")
        await response.read()
    assert up.max_active == 1
    assert [kind for kind, _ in events].count("post") == 4


async def test_a_readied_connection_the_server_dropped_is_not_used(start):
    """A restart drops the connections checked by the old server: the next request checks a new one."""
    events: list[tuple[str, int]] = []
    up, transport = await start(checking_server(events))
    with_check(transport, ready=1)
    response = await transport.request("POST", "/v1/chat/completions", b"{}")
    await response.read()
    await until(lambda: not transport._readying and transport._pool.idle_checked(1) == 1)
    ready = transport._pool._idle[-1]
    ready_index = [index for kind, index in events if kind == "check"][-1]
    ready.transport.close()  # what the server's exit does to it, seen from here
    await until(lambda: ready.dead)
    events.append(("request", 1))
    response = await transport.request("POST", "/v1/chat/completions", b"{}")
    await response.read()
    begun = events.index(("request", 1))
    post = next(event for event in events[begun:] if event[0] == "post")
    assert post[1] != ready_index and ("check", post[1]) in events[begun:]


class _Callbacks:
    """What httptools' on_header gives for the final head: the pairs head_fields() must reproduce."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.interim = 0
        self.parser = None
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:   # (a message after the response is not its head)
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        if self.done:
            return
        if self.parser.get_status_code() < 200:
            self.fields, self.interim = [], self.interim + 1
        else:
            self.done = True


_token = st.text("abcXYZ-_!#.~019", min_size=1, max_size=8)
_value = st.text("ab Z:;,=\t\"/()é09", max_size=12)
_head = st.builds(
    lambda line, fields: line + "".join(f"{name}:{value}\r\n" for name, value in fields) + "\r\n",
    st.sampled_from(["HTTP/1.1 200 OK\r\n", "HTTP/1.1 404 Not Found\r\n", "HTTP/1.0 502 \r\n", "HTTP/1.1 100 Continue\r\n",
                     "\r\nHTTP/1.1 204 No Content\r\n", "HTTP/1.1 103 Early Hints\r\n"]),
    st.lists(st.tuples(_token, _value), max_size=6))


@settings(max_examples=400, deadline=None)
@given(st.lists(_head, min_size=1, max_size=3), st.text("x\r\n", max_size=20), st.integers(1, 200))
def test_head_fields_matches_httptools_on_header(heads, tail, split):
    """head_fields() on the received bytes (split into two reads) gives what httptools' per-header callback gave
    (decoded as latin-1)."""
    import httptools

    received = "".join(heads).encode("latin-1") + tail.encode()
    seen = _Callbacks()
    seen.parser = parser = httptools.HttpResponseParser(seen)
    fed = b""
    try:
        for piece in (received[:split], received[split:]):
            if not seen.done:
                fed += piece
                parser.feed_data(piece)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    if seen.done:
        assert transport_module.head_fields(fed, seen.interim) == [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in seen.fields]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["release", "take", "die", "close_idle"]), st.integers(0, 5),
                          st.booleans()), max_size=40))
def test_idle_checked_count_follows_the_idle_connections(steps):
    """The pool's running count of checked idle connections equals a count of them, whatever comes and goes."""
    pool = transport_module._Pool(None, 100, 1.0, "b")
    conns = []
    for op, index, checked in steps:
        if op == "release":
            conn = transport_module._Connection(pool)
            conn.checked = checked
            pool._open += 1
            conns.append(conn)
            pool.release(conn)
        elif op == "take":
            pool.take_idle()
        elif op == "die" and conns:
            conns[index % len(conns)].close()
        elif op == "close_idle":
            pool.close_idle()
        for enough in (1, 3, 100):
            assert pool.idle_checked(enough) == min(sum(c.checked for c in pool._idle), enough)

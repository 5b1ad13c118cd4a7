"""gateway/http_server.py over raw sockets: framing, keep-alive, pipelining, limits, timeouts, disconnects, lifespan.

The server runs on its own uvloop in a thread, with a small ASGI app whose paths exercise one behaviour each.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http_server import DISCONNECT_EXTENSION, STATUS, Server, ServerLimits

BODY_LIMIT = 1000


class App:
    def __init__(self) -> None:
        self.events: list[str] = []          # lifespan messages and what /hold saw after its first chunk
        self.bodies: list[int] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.events.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        path = scope["path"]
        if path == "/boom":
            raise ValueError("boom")
        if path == "/limit":   # the gateway's read_body: refuse past the limit, and close
            size = 0
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if size > BODY_LIMIT:
                    return await reply(send, 413, b"too large", [(b"connection", b"close")])
                if not message.get("more_body"):
                    return await reply(send, 200, b"ok")
        if path == "/early":   # begins its response, then reads the body
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"started", "more_body": True})
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
            self.events.append("early: " + message["type"])
            return
        if path == "/refuse":   # answers before reading the body (the gateway's 401)
            return await reply(send, 401, b"no")
        body, chunks = b"", 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.events.append("disconnect-early")
                return
            body += message.get("body", b"")
            chunks += 1
            if not message.get("more_body"):
                break
        self.bodies.append(len(body))
        if path == "/slow":
            await asyncio.sleep(float(scope["query_string"] or 0.2))
        if path == "/stream":   # no content-length: chunked
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for part in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path == "/hold":   # a stream the client abandons: the app must see http.disconnect
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            message = await receive()
            self.events.append(message["type"])
            return
        if path == "/watch":   # a stream that does not read: the hang-up arrives through the kimi.disconnect callback
            gone = asyncio.Event()
            scope["extensions"][DISCONNECT_EXTENSION](lambda: (self.events.append("callback"), gone.set()))
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await gone.wait()
            self.events.append("watch ended")
            return
        if path == "/watch-late":   # registers only after the client is gone: called at once
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            self.events.append((await receive())["type"])
            scope["extensions"][DISCONNECT_EXTENSION](lambda: self.events.append("late callback"))
            return
        if path == "/watch-done":   # a complete response: a hang-up afterwards calls nothing
            scope["extensions"][DISCONNECT_EXTENSION](lambda: self.events.append("callback after the end"))
            return await reply(send, 200, b"done")
        if path == "/inject":
            return await reply(send, 200, b"x", [(b"x-evil", b"a\r\nset-cookie: b")])
        answer = json.dumps({"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                             "length": len(body), "chunks": chunks, "client": scope["client"] is not None,
                             "server_port": scope["server"][1]}).encode()
        await reply(send, 200, answer)


async def reply(send, status: int, body: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Running:
    def __init__(self, limits: ServerLimits) -> None:
        self.app = App()
        self.server = Server(self.app, "127.0.0.1", 0, limits=limits)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while self.server.sockname is None:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.port = self.server.sockname[1]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture
def running():
    server = Running(ServerLimits(keepalive_s=1.0, head_timeout_s=1.0, body_timeout_s=1.0, max_head_bytes=4096,
                                  grace_s=2.0))
    yield server
    server.stop()


def request(path: str, body: bytes = b"", method: str = "POST", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Reader:
    """Reads responses off one socket, by content-length or chunked framing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self.fill(), f"closed before a response head: {self.buf!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only or status == 100:
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self.fill()
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    assert self.fill()
                body, self.buf = body + self.buf[:size], self.buf[size + 2:]
                if size == 0:
                    return status, headers, body
        length = int(headers.get("content-length", 0))
        while len(self.buf) < length:
            assert self.fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self, within: float = 5.0) -> bool:
        self.sock.settimeout(within)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def answered_then_closed(running, data: bytes) -> tuple[int, dict, bytes]:
    """Send `data` on a new connection: the one response, after which the server closes the connection."""
    with running.connect() as sock:
        sock.sendall(data)
        reader = Reader(sock)
        answer = reader.response()
        assert reader.closed()
    return answer


def test_keep_alive_serves_several_requests_on_one_connection(running):
    with running.connect() as sock:
        reader = Reader(sock)
        for index in range(3):
            sock.sendall(request(f"/echo?i={index}", b"x" * index))
            status, headers, body = reader.response()
            doc = json.loads(body)
            assert status == 200 and doc["length"] == index and doc["query"] == f"i={index}"
            assert "connection" not in headers and headers["date"].endswith("GMT")
            assert doc["client"] and doc["server_port"] == running.port


def test_pipelined_requests_are_answered_in_order(running):
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("/slow", b"a" * 10) + request("/echo", b"b" * 20) + request("/echo", b"c" * 30))
        lengths = [json.loads(reader.response()[2])["length"] for _ in range(3)]
    assert lengths == [10, 20, 30]


def test_chunked_request_body_is_reassembled(running):
    with running.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"hello", b" ", b"world" * 100):
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            time.sleep(0.02)
        sock.sendall(b"0\r\n\r\n")
        status, _, body = Reader(sock).response()
    assert status == 200 and json.loads(body)["length"] == 506


def test_large_body_arrives_whole_through_flow_control(running):
    payload = b"z" * (3 * 1024 * 1024)
    with running.connect() as sock:
        sock.sendall(request("/echo", payload))
        status, _, body = Reader(sock).response()
    assert status == 200 and json.loads(body)["length"] == len(payload)


def test_chunked_response_without_content_length(running):
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("/stream"))
        status, headers, body = reader.response()
        assert status == 200 and headers["transfer-encoding"] == "chunked" and body == b"one,two,three"
        sock.sendall(request("/echo", b"again"))   # the connection is still usable after the terminator
        assert json.loads(reader.response()[2])["length"] == 5


def openai_error(headers: dict, body: bytes, error_type: str) -> dict:
    """What the server answers itself is an OpenAI-shaped JSON error, like every error of the app."""
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == error_type and error["message"] and set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_request_gets_400_and_close(running):
    status, headers, body = answered_then_closed(running, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400 and headers["connection"] == "close"
    openai_error(headers, body, "invalid_request_error")


def test_bad_content_length_gets_400(running):
    with running.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n")
        assert Reader(sock).response()[0] == 400


def test_oversized_head_gets_431_and_close(running):
    status, headers, body = answered_then_closed(running, request("/echo", extra="x-big: " + "a" * 5000 + "\r\n"))
    assert status == 431
    openai_error(headers, body, "invalid_request_error")


def test_oversized_body_gets_the_apps_413_and_close(running):
    status, headers, body = answered_then_closed(running, request("/limit", b"y" * 50_000))
    assert status == 413 and body == b"too large" and headers["connection"] == "close"


def test_answer_before_the_body_keeps_the_connection_usable(running):
    """An app that answers without reading the body (the gateway's 401 sets `connection: close` itself): the
    rest of the body is read and dropped, and the next request on the connection is parsed correctly."""
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("/refuse", b"q" * 200_000) + request("/echo", b"next"))
        assert reader.response()[0] == 401
        assert json.loads(reader.response()[2])["length"] == 4


def test_expect_100_continue_is_answered_when_the_app_reads(running):
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert reader.response(head_only=True)[0] == 100
        sock.sendall(b"12345")
        status, _, body = reader.response()
    assert status == 200 and json.loads(body)["length"] == 5


def test_expect_100_continue_is_not_sent_when_the_app_refuses_first(running):
    with running.connect() as sock:
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert Reader(sock).response()[0] == 401


def test_head_has_no_body(running):
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("/echo", method="HEAD"))
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        sock.sendall(request("/echo", b"abc"))   # nothing of a body was written: the next response parses
        assert json.loads(reader.response()[2])["length"] == 3


def test_options_reaches_the_app(running):
    with running.connect() as sock:
        sock.sendall(request("/echo", method="OPTIONS"))
        status, _, body = Reader(sock).response()
    assert status == 200 and json.loads(body)["method"] == "OPTIONS"


def test_http_1_0_closes_after_the_response(running):
    status, headers, _ = answered_then_closed(running, b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    assert status == 200 and headers["connection"] == "close"


def test_connection_close_from_the_client(running):
    assert answered_then_closed(running, request("/echo", extra="Connection: close\r\n"))[0] == 200


def test_idle_keep_alive_connection_is_closed(running):
    with running.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("/echo"))
        assert reader.response()[0] == 200
        started = time.monotonic()
        assert reader.closed(within=5)
        assert time.monotonic() - started >= 0.5


def test_slow_head_gets_408(running):
    with running.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\n")   # and nothing more
        reader = Reader(sock)
        sock.settimeout(5)
        status, headers, body = reader.response()
        assert status == 408
        openai_error(headers, body, "invalid_request_error")
        assert reader.closed()


def test_stalled_body_is_cut_and_the_app_sees_the_disconnect(running):
    with running.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        reader = Reader(sock)
        assert reader.closed(within=5)
    deadline = time.monotonic() + 5
    while "disconnect-early" not in running.app.events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "disconnect-early" in running.app.events


def test_client_gone_mid_stream_reaches_the_app_as_disconnect(running):
    sock = running.connect()
    sock.sendall(request("/hold"))
    reader = Reader(sock)
    reader.response(head_only=True)
    while b"first" not in reader.buf:
        assert reader.fill()
    sock.close()
    deadline = time.monotonic() + 5
    while "http.disconnect" not in running.app.events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "http.disconnect" in running.app.events


def wait_for_event(running, event: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while event not in running.app.events and time.monotonic() < deadline:
        time.sleep(0.02)
    return event in running.app.events


def test_client_gone_mid_stream_calls_the_disconnect_callback_without_a_receive(running):
    """The kimi.disconnect extension: the app learns of the hang-up with no task waiting on receive()."""
    sock = running.connect()
    sock.sendall(request("/watch"))
    reader = Reader(sock)
    reader.response(head_only=True)
    while b"first" not in reader.buf:
        assert reader.fill()
    sock.close()
    assert wait_for_event(running, "watch ended")
    assert running.app.events.count("callback") == 1


def test_disconnect_callback_registered_after_the_hang_up_is_called_at_once(running):
    sock = running.connect()
    sock.sendall(request("/watch-late"))
    reader = Reader(sock)
    reader.response(head_only=True)
    while b"first" not in reader.buf:
        assert reader.fill()
    sock.close()
    assert wait_for_event(running, "late callback")
    assert running.app.events[-2:] == ["http.disconnect", "late callback"]


def test_disconnect_callback_is_not_called_after_a_complete_response(running):
    with running.connect() as sock:
        sock.sendall(request("/watch-done"))
        assert Reader(sock).response()[2] == b"done"
    with running.connect() as sock:   # the server has read the first close by the time it answers this
        sock.sendall(request("/echo"))
        assert Reader(sock).response()[0] == 200
    assert not wait_for_event(running, "callback after the end", within=0.3)


def test_app_exception_gives_500(running):
    status, headers, body = answered_then_closed(running, request("/boom"))
    assert status == 500
    openai_error(headers, body, "server_error")


def test_header_injection_from_the_app_is_refused(running):
    with running.connect() as sock:
        sock.sendall(request("/inject"))
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 500 and "set-cookie" not in headers


def test_lifespan_runs_startup_then_shutdown():
    server = Running(ServerLimits())
    assert server.app.events == ["lifespan.startup"]
    with server.connect() as sock:
        sock.sendall(request("/echo"))
        assert Reader(sock).response()[0] == 200
    server.stop()
    assert server.app.events == ["lifespan.startup", "lifespan.shutdown"]


def test_stop_lets_a_running_response_finish():
    server = Running(ServerLimits(grace_s=5))
    with server.connect() as sock:
        sock.sendall(request("/slow?1.5", b"s"))   # longer than the server's 0.5 s look at `should_exit`
        time.sleep(0.05)
        server.server.should_exit = True
        reader = Reader(sock)
        status, headers, _ = reader.response()
        assert status == 200 and headers["connection"] == "close"
    server.thread.join(10)
    assert not server.thread.is_alive()


def test_upgrade_request_is_answered_as_plain_http_then_closed(running):
    """No websockets here: the request is served, and the connection (whose bytes after the head would belong
    to another protocol) closes after the answer."""
    status, headers, _ = answered_then_closed(
        running, b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert status == 200 and headers["connection"] == "close"


@pytest.mark.parametrize("app_read_first_chunk", [False, True])
def test_broken_chunked_body_gets_a_json_400_and_close_and_the_app_sees_the_disconnect(running, app_read_first_chunk):
    """A chunked body that turns malformed after the app began reading it: no response has started, so the
    client gets a 400 with an OpenAI-shaped error (not a bare close); the app sees `http.disconnect`."""
    with running.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        if app_read_first_chunk:
            time.sleep(0.2)   # (whether the app has read the first chunk or not, the answer is the same)
        sock.sendall(b"ZZZ\r\n")
        reader = Reader(sock)
        status, headers, body = reader.response()
        assert reader.closed()
    assert status == 400 and headers["connection"] == "close" and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and set(error) == {"message", "type", "param",
                                                                                           "code"}
    assert wait_for_event(running, "disconnect-early")
    assert running.app.bodies == []   # the app answered nothing of its own


def test_broken_chunked_body_after_the_response_began_cuts_the_connection(running):
    """An app that began its response before the body was read: a broken body can only close the connection."""
    with running.connect() as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        reader = Reader(sock)
        status, headers, _ = reader.response(head_only=True)
        sock.sendall(b"ZZZ\r\n")
        assert reader.closed()
    assert status == 200 and b"HTTP/1.1 400" not in reader.buf
    assert wait_for_event(running, "early: http.disconnect")


@pytest.mark.parametrize("http", ["lean", "uvicorn"])
def test_serve_http_option_picks_the_server(http):
    """`serve --http`: both servers run the same app, on a socket bound as `--workers` binds it."""
    from gateway.server import make_server

    app = App()
    server = make_server(app, "127.0.0.1", 0, True, http)
    assert isinstance(server, Server) == (http == "lean")
    import gateway.workers

    sock = gateway.workers.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve([sock]),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with conn:
        reader = Reader(conn)
        for size in (3, 70_000):
            conn.sendall(request("/echo", b"e" * size))
            status, _, body = reader.response()
            assert status == 200 and json.loads(body)["length"] == size
    server.should_exit = True
    thread.join(15)
    assert not thread.is_alive() and app.events == ["lifespan.startup", "lifespan.shutdown"]


def test_non_ascii_request_target_gets_400(running):
    assert answered_then_closed(running, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 400


def test_percent_encoded_path_is_decoded_and_the_query_left_alone(running):
    with running.connect() as sock:
        sock.sendall(request("/a%20b?x=%20"))
        doc = json.loads(Reader(sock).response()[2])
    assert doc["path"] == "/a b" and doc["query"] == "x=%20"


def test_failed_startup_logs_the_apps_message_once_and_exits_3(caplog):
    """As uvicorn: the message of `lifespan.startup.failed` as one error line, no traceback for the exception the
    app raises after it, then exit status 3 (the listener never opens)."""
    async def app(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "cannot start: no store"})
        raise RuntimeError("no store")

    server = Server(app, "127.0.0.1", 0)
    with pytest.raises(SystemExit) as stopped:
        uvloop.run(server.serve())
    assert stopped.value.code == 3 and server.sockname is None
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["cannot start: no store", "Application startup failed. Exiting."]
    assert not any(r.exc_info for r in errors)


def _reference_response_head(exchange, status: int, headers) -> bytes:
    """response_head() written plainly (each name lowered and compared, lines counted one by one): the reference
    its faster loop must match."""
    parts = [STATUS[status], exchange.conn.server.date]
    length, lines = None, 3
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            length = int(value)
        elif lowered == b"connection":
            if b"close" in value.lower():
                exchange.keep_alive = False
        elif lowered == b"transfer-encoding":
            if value.lower() == b"chunked":
                length = -1
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    if not exchange.keep_alive:
        parts.append(b"connection: close\r\n")
        lines += 1
    if length is None:
        if not exchange.no_body and status not in (204, 304) and status >= 200:
            exchange.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
            lines += 1
    elif length == -1:
        exchange.chunked = True
    else:
        exchange.remaining = length
    parts.append(b"\r\n")
    head = b"".join(parts)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise RuntimeError("invalid response header: a name or value contains CR or LF")
    return head


def _bare_exchange(keep_alive: bool, no_body: bool):
    from types import SimpleNamespace

    from gateway.http_server import Exchange

    exchange = Exchange.__new__(Exchange)
    exchange.conn = SimpleNamespace(server=SimpleNamespace(date=b"date: Tue, 01 Dec 2026 22:00:00 GMT\r\n"))
    exchange.keep_alive, exchange.no_body, exchange.chunked, exchange.remaining = keep_alive, no_body, False, 0
    return exchange


_names = st.sampled_from([b"content-length", b"Content-Length", b"connection", b"Connection", b"transfer-encoding",
                          b"Transfer-Encoding", b"content-type", b"x-request-id", b"x-content-length", b"connectionx",
                          b"server-timing", b"a\r\nb", b"content-length\n", b""])
_values = st.sampled_from([b"0", b"12", b" 7 ", b"close", b"Keep-Alive, Close", b"keep-alive", b"chunked", b"CHUNKED",
                           b"gzip, chunked", b"application/json", b"x\ny", b"x\rz", b"", b"abc"])


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([200, 201, 204, 304, 101, 404, 500]), st.lists(st.tuples(_names, _values), max_size=8),
       st.booleans(), st.booleans(), st.sampled_from([list, tuple, iter]))
def test_response_head_matches_the_plain_reference(status, headers, keep_alive, no_body, shape):
    """response_head() gives the plain loop's head, framing and keep-alive, or the same error."""
    new, old = _bare_exchange(keep_alive, no_body), _bare_exchange(keep_alive, no_body)
    try:
        expected = _reference_response_head(old, status, headers)
    except (RuntimeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            new.response_head(status, shape(headers))
        return
    assert new.response_head(status, shape(headers)) == expected
    assert (new.keep_alive, new.chunked, new.remaining) == (old.keep_alive, old.chunked, old.remaining)


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_request = st.builds(
    lambda crlf, method, path, version, body: (
        crlf + f"{method} {path} HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n"   # (1.0: kept alive)
        f"{'Connection: keep-alive' if version == '1.0' else 'X: y'}\r\n\r\n".encode() + body,
        version),
    st.sampled_from([b"", b"\r\n"]), st.sampled_from(["GET", "POST", "OPTIONS"]),
    st.sampled_from(["/", "/v1/chat/completions", "/a?b=c", "http://h/x", "*", "/%41"]),
    st.sampled_from(["1.1", "1.0"]),
    st.sampled_from([b"", b"hi", b"GET / HTTP/1.1\r\n", b"POST /v1/chat/completions HTTP/1.1\r\n", b" HTTP/1.1\r\n"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(_request, min_size=1, max_size=4), st.lists(st.integers(1, 120), max_size=4))
def test_scope_http_version_wherever_the_request_begins(requests, cuts):
    """The scope's http_version read from the request line (a request at the start of the bytes received) is the
    parser's, however the requests are split into reads or queued behind one another."""
    from types import SimpleNamespace

    from gateway.http_server import Connection, Exchange

    seen = []

    def start(exchange):
        seen.append(exchange.scope["http_version"])
        exchange.complete = True   # answered at once: the next request starts when it arrives

    server = SimpleNamespace(loop=None, now=0.0, limits=ServerLimits(), state={}, sockname=("127.0.0.1", 1))
    conn = Connection(server)
    conn.transport, conn.client = _Transport(), None
    data = b"".join(raw for raw, _ in requests)
    edges = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Exchange, "start", start)
        for begin, end in zip(edges, edges[1:]):
            conn.data_received(data[begin:end])
    assert seen == [version for _, version in requests]


class _PerCallbackCount:
    """The head limit as it was counted per parser callback (URL, then each header's name and value plus 4): the
    reference for whether a head is too large by the time the parser stops."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size, self.over, self.complete = limit, 0, False, False

    def on_message_begin(self) -> None:
        if not self.over and not self.complete:
            self.size = 0

    def on_url(self, url: bytes) -> None:
        self.add(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.add(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.complete = True

    def add(self, size: int) -> None:
        if not self.complete:
            self.size += size
            self.over = self.over or self.size > 300


@settings(max_examples=500, deadline=None)
@given(st.text("/abc", min_size=1, max_size=80), st.lists(st.tuples(st.text("ab-", min_size=1, max_size=30),
                                                                     st.text("xy ", max_size=60)), max_size=12),
       st.booleans(), st.sampled_from([b"", b"\x00bad"]), st.lists(st.integers(1, 400), max_size=4))
def test_head_limit_decided_as_per_header_counting_did(path, fields, complete, junk, cuts):
    """A 431 exactly when the URL and the headers the parser delivered (each name and value, 4 bytes more) went over
    max_head_bytes, whatever the reads; a broken head under the limit is a 400."""
    import httptools
    from types import SimpleNamespace

    from gateway.http_server import Connection, Exchange

    head = (f"GET /{path} HTTP/1.1\r\n" + "".join(f"{name}:{value}\r\n" for name, value in fields)
            + ("\r\n" if complete else "")).encode() + junk
    reference = _PerCallbackCount(300)
    try:
        httptools.HttpRequestParser(reference).feed_data(head)
    except httptools.HttpParserError:
        pass
    server = SimpleNamespace(loop=None, now=0.0, limits=ServerLimits(max_head_bytes=300), state={},
                             sockname=("127.0.0.1", 1))
    conn = Connection(server)
    conn.transport, conn.client = _Transport(), None
    written = []
    conn.transport.write = written.append
    edges = sorted({0, len(head), *(min(cut, len(head)) for cut in cuts)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Exchange, "start", lambda exchange: setattr(exchange, "complete", True))   # answered at once
        for begin, end in zip(edges, edges[1:]):
            if not conn.transport.closed:
                conn.data_received(head[begin:end])
    status = int(written[0].split(b" ", 2)[1]) if written else None
    if reference.over:
        assert status == 431
    else:
        assert status in (None, 400) and (status == 400) == (junk != b"")

"""The gateway's own HTTP/1.1 server (`server: lean`): httptools on uvloop, calling the same ASGI app as uvicorn.

Why: the server under the app was a third of the gateway's CPU per request (bench/README.md, "The server under
the app"). This one does what the gateway needs and no more, with the per-request work kept to a scope dict,
one task, and one write per response that fits in one send (the head goes out with the first body bytes).

What it keeps of uvicorn's behaviour (tests/unit/gateway/test_http_server.py checks each over raw sockets):
- keep-alive (HTTP/1.1 by default, `connection: close` either way), HTTP/1.0 closes after the response;
- pipelining: requests that arrive while one is answered wait in order, reading paused, answered one by one;
- request bodies by content-length or chunked, handed to the app as they arrive; past 64 KiB unread, reading
  pauses until the app asks for more (a large upload is never buffered whole here: the app's limit, 413, holds);
- responses with content-length, or chunked when the app gives none; HEAD writes no body;
- `expect: 100-continue` answered when the app first reads the body (not when it refuses before reading);
- malformed requests: 400 and close; a request head over `max_head_bytes`: 431 and close; a body that turns
  malformed while the app reads it: 400 with an OpenAI-shaped JSON error unless the response began, then close;
- timeouts: an idle keep-alive connection closes after `keepalive_s`; a head not complete `head_timeout_s`
  after its first byte gets 408 and close; a body with no bytes for `body_timeout_s` closes the connection
  (the app sees `http.disconnect`);
- a client that hangs up: the app's receive() answers `http.disconnect` (and does so by itself once the
  response is complete), further sends are dropped; and, without a receive() waiting for it, a callback the app
  registered through the scope's `kimi.disconnect` extension is called (DISCONNECT_EXTENSION below);
- lifespan startup and shutdown; on stop, listeners close, idle connections close, the others close after
  their response, and whatever still runs after `grace_s` is cancelled; the `date` header, once a second.
No websockets and no TLS: the gateway serves neither (a TLS-terminating proxy goes in front).
"""
from __future__ import annotations

import asyncio
import collections
import http
import logging
import socket
import time
from email.utils import formatdate
from urllib.parse import unquote

import httptools

from gateway.errors import error_body

log = logging.getLogger(__name__)

HIGH_WATER = 64 * 1024   # request body bytes buffered before reading pauses
TICK_S = 0.5             # the clock of the timeouts and the `date` header


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


STATUS = {code: _status_line(code) for code in range(100, 600)}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
DISCONNECT = {"type": "http.disconnect"}
# scope["extensions"][DISCONNECT_EXTENSION](callback): `callback()` is called once, from the event loop, when the
# client's connection is lost before the response is complete (at once if it already is). An app that needs to
# know of a hang-up while it does not read (the gateway's DisconnectWatcher) needs no task waiting on receive().
DISCONNECT_EXTENSION = "kimi.disconnect"
ASGI = {"version": "3.0", "spec_version": "2.3"}
METHODS = {name.encode(): name for name in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE")}
IDLE, HEAD, BODY, APP = range(4)   # what a connection waits for; the first three have a timeout


class ServerLimits:
    __slots__ = ("keepalive_s", "head_timeout_s", "body_timeout_s", "max_head_bytes", "grace_s")

    def __init__(self, keepalive_s: float = 5.0, head_timeout_s: float = 30.0, body_timeout_s: float = 60.0,
                 max_head_bytes: int = 64 * 1024, grace_s: float = 10.0) -> None:
        self.keepalive_s, self.head_timeout_s, self.body_timeout_s = keepalive_s, head_timeout_s, body_timeout_s
        self.max_head_bytes, self.grace_s = max_head_bytes, grace_s


class HeadTooLarge(Exception):
    pass


def json_error_response(code: int, message: str) -> bytes:
    """An OpenAI-shaped error (gateway/errors.py) for what the server answers itself (a request it cannot parse, a
    head too large or too slow, an app that failed before its response), then close: clients parse every error
    body as JSON, these included."""
    body = error_body(message, "server_error" if code >= 500 else "invalid_request_error")
    return (STATUS[code] + b"content-type: application/json\r\nconnection: close\r\n"
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs one Exchange (the app's request) at a time."""

    __slots__ = ("server", "loop", "parser", "transport", "client", "url", "headers", "head_bytes", "received",
                 "max_head", "expect",
                 "exchange", "pipeline", "reading", "write_paused", "drained", "phase", "since", "upgrade", "between",
                 "start")

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport = None
        self.exchange: Exchange | None = None
        self.pipeline: collections.deque | None = None
        self.reading = True
        self.write_paused = False
        self.drained: asyncio.Future | None = None
        self.phase, self.since = IDLE, server.now
        self.url, self.headers, self.expect, self.upgrade = b"", [], False, False
        # The head's size as max_head_bytes counts it (head_size()) is worked out only when the bytes received since
        # the request began (head_bytes, from the read it began in) could reach it: not per header, for every request
        self.head_bytes = self.received = 0
        self.max_head = server.limits.max_head_bytes
        # `start`: the bytes received, when they begin where a request begins (the parser was between messages),
        # so that on_headers_complete reads the HTTP version there: the parser's get_http_version() formats a str,
        # ~2,300 instructions
        self.between, self.start = True, None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # a head written apart from its first chunk must not wait for an ACK (Nagle): ~40 ms of TTFT
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        exchange = self.exchange
        if exchange is not None and not exchange.complete:
            exchange.disconnected = True
            exchange.wake()
            if exchange.on_lost is not None:
                on_lost, exchange.on_lost = exchange.on_lost, None
                on_lost()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.write_paused = False
        if self.pipeline:
            self.pipeline.clear()

    def eof_received(self) -> None:
        pass  # a half-closed client still gets its answer; the transport closes after it

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.phase == IDLE:
            self.phase, self.since = HEAD, self.server.now
        self.start = data if self.between else None
        self.between = False
        self.received = size = len(data)
        self.head_bytes += size
        try:
            self.parser.feed_data(data)
        except HeadTooLarge:
            self.refuse(431, "Request header fields too large.")
        except httptools.HttpParserUpgrade:
            if self.exchange is not None:   # no protocol switch here: answer the request, then close
                self.exchange.keep_alive = False
            self.pause_reading()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge) or (self.phase == HEAD and self.head_too_large()):
                self.refuse(431, "Request header fields too large.")
            else:
                self.refuse(400, "Invalid HTTP request received.")
        else:
            if self.phase == HEAD and self.head_too_large():   # a head still arriving
                self.refuse(431, "Request header fields too large.")

    def head_too_large(self) -> bool:
        """Whether the head so far (the URL and each header's name and value, 4 bytes more a header) is over the
        limit. It is at most 5/4 of the bytes it came in (each header line takes 4 or more), so those decide first
        whether to add it up."""
        if self.head_bytes * 5 <= self.max_head * 4:
            return False
        return len(self.url) + sum([len(name) + len(value) + 4 for name, value in self.headers]) > self.max_head

    def refuse(self, code: int, text: str) -> None:
        """A request that cannot be parsed (or a slow one): answered here, then the connection closes. With a
        request still being answered, that one finishes first and the connection closes after it."""
        if self.transport.is_closing():
            return
        exchange = self.exchange
        if exchange is not None and not exchange.complete and exchange.more_body and not self.pipeline:
            # its own body is broken: answered here when the app has not begun its response (the app, waiting for
            # the rest, sees a disconnect and its sends are dropped), then the connection closes
            if not exchange.started:
                self.transport.write(json_error_response(code, text))
            exchange.disconnected = True
            exchange.wake()
            self.transport.close()
            return
        if exchange is not None and not exchange.complete:
            exchange.keep_alive = False
            if self.pipeline:
                self.pipeline.clear()
            self.pause_reading()
            return
        self.transport.write(json_error_response(code, text))
        self.transport.close()

    # ---------------------------------------------------------------- parser callbacks

    # No on_message_begin: a parser callback costs ~1,800 instructions, the most of it the call. What it would do
    # is done where a request ends (its fields start empty again) and at its URL (its head's clock starts).

    def on_url(self, url: bytes) -> None:
        self.url += url
        if self.phase != HEAD:   # (data_received set it when the connection was idle)
            self.phase, self.since = HEAD, self.server.now

    def on_header(self, name: bytes, value: bytes) -> None:   # (its size is counted in head_too_large())
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head_bytes * 5 > self.max_head * 4 and self.head_too_large():   # (its first test, without a call)
            raise HeadTooLarge
        parser, url = self.parser, self.url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:   # absolute-form (`GET http://host/path`) or `*`
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            raise httptools.HttpParserError("non-ASCII request target") from None
        if "%" in path:
            path = unquote(path)
        method = parser.get_method()
        start, at = self.start, len(method) + len(url) + 1   # (where the request line's version is)
        if start is not None and start[at:at + 11] == b" HTTP/1.1\r\n":
            version = "1.1"
        else:   # a head that arrived in pieces or behind another request, after empty lines, or not HTTP/1.1
            version = parser.get_http_version()
        server = self.server
        method = METHODS.get(method) or method.decode("ascii")
        scope = {"type": "http", "asgi": ASGI, "http_version": version, "method": method,
                 "scheme": "http", "path": path, "raw_path": raw_path, "query_string": query, "root_path": "",
                 "headers": self.headers, "client": self.client, "server": server.sockname}
        if server.state:
            scope["state"] = server.state.copy()
        exchange = Exchange(self, scope, version != "1.0" and parser.should_keep_alive(), self.expect)
        scope["extensions"] = {DISCONNECT_EXTENSION: exchange.on_disconnect}
        self.url, self.headers, self.expect = b"", [], False   # (the next request's)
        self.phase, self.since = BODY, server.now
        current = self.exchange
        if current is None or current.complete:
            self.exchange = exchange
            exchange.start()
        else:   # pipelined behind one still being answered: it waits its turn, and reading pauses meanwhile
            if self.pipeline is None:
                self.pipeline = collections.deque()
            self.pipeline.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.pipeline[-1] if self.pipeline else self.exchange
        self.since = self.server.now
        if exchange.complete:
            return   # the app answered without reading it all; the rest is read and dropped
        exchange.body.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER:
            self.pause_reading()
        if exchange.waiter is not None:   # (most often none: the body came with the head)
            exchange.wake()

    def on_message_complete(self) -> None:
        # a request after this one in the same bytes neither begins them nor has more of them than they hold
        self.start, self.between, self.head_bytes = None, True, self.received
        exchange = self.pipeline[-1] if self.pipeline else self.exchange
        exchange.more_body = False
        self.phase = IDLE if exchange.complete else APP
        if exchange.waiter is not None:
            exchange.wake()

    # ---------------------------------------------------------------- between requests

    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and not self.pipeline and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def finished(self, exchange: "Exchange") -> None:
        """The response to `exchange` is complete: the next pipelined request, or wait for one."""
        if not exchange.keep_alive:
            self.transport.close()
            return
        if self.pipeline:
            self.exchange = nxt = self.pipeline.popleft()
            nxt.start()
            self.resume_reading()   # once the queue is empty
        else:
            if exchange.more_body:   # answered before its body was all read: the rest is read and dropped
                self.phase, self.since = BODY, self.server.now
            else:
                self.phase, self.since = IDLE, self.server.now
            self.resume_reading()

    def timed_out(self, now: float) -> None:
        if self.phase == IDLE:
            self.transport.close()
        elif self.phase == HEAD:
            self.refuse(408, "Request timeout: the request head did not arrive in time.")
        else:   # BODY: the app waiting on receive() sees the disconnect
            self.transport.close()

    def shutdown(self) -> None:
        """The server stops: an idle connection closes now, a busy one after its response."""
        exchange = self.exchange
        if exchange is None or exchange.complete:
            self.transport.close()
        else:
            exchange.keep_alive = False


class Exchange:
    """One request and its response: the ASGI receive() and send() of the app's call."""

    __slots__ = ("conn", "transport", "scope", "keep_alive", "expect", "body", "buffered", "more_body", "delivered",
                 "waiter", "disconnected", "started", "complete", "head", "chunked", "remaining", "no_body", "on_lost",
                 "task")

    def __init__(self, conn: Connection, scope: dict, keep_alive: bool, expect: bool) -> None:
        self.conn, self.transport, self.scope = conn, conn.transport, scope
        self.keep_alive, self.expect = keep_alive, expect
        self.body: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.delivered = False   # the last http.request message (more_body false) went to the app
        self.waiter: asyncio.Future | None = None
        self.disconnected = self.started = self.complete = False
        self.head: bytes | None = None
        self.chunked = False
        self.remaining = 0
        self.no_body = scope["method"] == "HEAD"
        self.on_lost = None

    def on_disconnect(self, callback) -> None:
        """The `kimi.disconnect` extension: `callback()` once the client is gone before the response is complete."""
        if self.disconnected and not self.complete:
            callback()
        elif not self.complete:
            self.on_lost = callback

    def start(self) -> None:
        conn = self.conn
        # the scope goes to the app's task alone: the exchange keeping it would make a reference cycle through
        # the scope's kimi.disconnect (a bound method of this exchange), left to the cyclic GC every request
        scope, self.scope = self.scope, None
        self.task = task = conn.loop.create_task(self.run(conn.server.app, scope))
        conn.server.tasks.add(task)   # run() takes it out as it ends (cheaper than a done callback)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def run(self, app, scope: dict) -> None:
        try:
            await app(scope, self.receive, self.send)
        except BaseException as exc:
            self.conn.server.tasks.discard(self.task)
            if isinstance(exc, asyncio.CancelledError):   # the client left, or the server stopped and cut it
                if not self.complete:
                    self.transport.close()
                return
            log.error("exception in the ASGI app", exc_info=exc)
            if not self.started and not self.disconnected:
                self.keep_alive = False
                self.transport.write(json_error_response(500, "Internal Server Error"))
                self.complete = True
                self.transport.close()
            elif not self.complete:
                self.transport.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            self.conn.server.tasks.discard(self.task)
            if not self.complete and not self.disconnected:
                if not self.started:
                    log.error("the ASGI app returned without starting its response")
                    self.transport.write(json_error_response(500, "Internal Server Error"))
                else:
                    log.error("the ASGI app returned without completing its response")
                self.complete = True
                self.transport.close()

    async def receive(self) -> dict:
        if self.expect:
            self.expect = False
            if not self.started and not self.transport.is_closing():
                self.transport.write(CONTINUE)
        if not self.body and not self.disconnected and not self.complete and (self.more_body or self.delivered):
            self.conn.resume_reading()
            self.waiter = waiter = self.conn.loop.create_future()
            await waiter
        if self.disconnected or self.complete:
            return DISCONNECT
        body = self.body
        chunk = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        if body:
            self.body, self.buffered = [], 0
            if not self.conn.reading and self.conn.exchange is self:
                self.conn.resume_reading()
        if not self.more_body:
            self.delivered = True
        return {"type": "http.request", "body": chunk, "more_body": self.more_body}

    async def send(self, message: dict) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            if conn.drained is None or conn.drained.done():
                conn.drained = conn.loop.create_future()
            await conn.drained
        if self.disconnected:
            return
        if not self.started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {message['type']!r}")
            self.head = self.response_head(message["status"], message.get("headers", ()))
            self.started = True
            self.expect = False
            return
        if self.complete:
            raise RuntimeError(f"{message['type']!r} sent after the response was complete")
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {message['type']!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        head, self.head = self.head, None
        if self.no_body:
            out = b""
        elif self.chunked:
            out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
        else:
            self.remaining -= len(body)
            if self.remaining < 0:
                raise RuntimeError("response body longer than its content-length")
            out = body
        if head is not None:
            out = head + out
        if out:
            self.transport.write(out)
        if not more:
            if self.remaining and not self.no_body:
                raise RuntimeError("response body shorter than its content-length")
            self.complete = True
            self.on_lost = None
            if self.waiter is not None:
                self.wake()
            conn.finished(self)

    def response_head(self, status: int, headers) -> bytes:
        parts = [STATUS[status], self.conn.server.date]
        length = None
        for name, value in headers:
            if len(name) in {14, 10, 17}:   # only names this long can be the three read here (a constant frozenset)
                lowered = name.lower()
                if lowered == b"content-length":
                    length = int(value)
                elif lowered == b"connection":
                    if b"close" in value.lower():
                        self.keep_alive = False
                elif lowered == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        length = -1
            parts += (name, b": ", value, b"\r\n")
        lines = (len(parts) + 10) >> 2   # 4 parts a header; and the status line, `date`, the blank line
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
            lines += 1
        if length is None:
            if not self.no_body and status not in (204, 304) and status >= 200:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
                lines += 1
        elif length == -1:
            self.chunked = True
        else:
            self.remaining = length
        parts.append(b"\r\n")
        head = b"".join(parts)
        # one line per header: a name or value carrying CR or LF would split the response (header injection)
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise RuntimeError("invalid response header: a name or value contains CR or LF")
        return head


class Lifespan:
    """ASGI lifespan: startup before the listener opens, shutdown after the last request. A failed startup is
    logged as uvicorn logs it (the app's message as one error line; a traceback only when the app said nothing),
    then the process exits with uvicorn's status 3."""

    def __init__(self, app, state: dict) -> None:
        self.app, self.state = app, state
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.failed = False
        self.task: asyncio.Task | None = None

    async def receive(self) -> dict:
        return await self.queue.get()

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind.endswith(".failed"):
            self.failed = True
            if message.get("message"):
                log.error("%s", message["message"])
        (self.started if kind.startswith("lifespan.startup") else self.stopped).set()

    async def run(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI, "state": self.state}
        try:
            await self.app(scope, self.receive, self.send)
        except BaseException as exc:
            if not self.failed:   # an app that sent `.failed` has said why; the exception is that same failure
                self.failed = True
                log.error("exception in the ASGI lifespan", exc_info=exc)
        finally:
            self.started.set()
            self.stopped.set()

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())
        await self.queue.put({"type": "lifespan.startup"})
        await self.started.wait()
        if self.failed:
            log.error("Application startup failed. Exiting.")
            raise SystemExit(3)

    async def shutdown(self) -> None:
        await self.queue.put({"type": "lifespan.shutdown"})
        await self.stopped.wait()


class Server:
    """The listener(s) of one ASGI app; `should_exit` and `serve(sockets)` as uvicorn.Server has them, so
    gateway/server.py drives either the same way."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, lifespan: bool = True,
                 limits: ServerLimits | None = None) -> None:
        self.app, self.host, self.port, self.lifespan = app, host, port, lifespan
        self.limits = limits or ServerLimits()
        self.should_exit = False
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.state: dict = {}
        self.sockname: tuple | None = None
        self.listeners: list = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.now = time.monotonic()
        self.date = b""
        self.started = False

    def tick(self) -> None:
        self.now = now = time.monotonic()
        self.date = b"date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"
        limits = self.limits
        limit = (limits.keepalive_s, limits.head_timeout_s, limits.body_timeout_s)
        # a connection whose reading we paused (pipelined requests queued, an unread body) is not the client's delay
        for conn in [c for c in self.connections if c.phase != APP and c.reading and now - c.since > limit[c.phase]]:
            conn.timed_out(now)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.tick()
        lifespan = Lifespan(self.app, self.state) if self.lifespan else None
        if lifespan is not None:
            await lifespan.startup()
        if sockets:
            self.listeners = [await loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
                              for sock in sockets]
        else:
            self.listeners = [await loop.create_server(lambda: Connection(self), self.host, self.port,
                                                       backlog=2048, reuse_address=True)]
        bound = self.listeners[0].sockets[0].getsockname()
        self.sockname = (bound[0], bound[1])
        self.started = True
        log.info("serving HTTP on %s:%d", *self.sockname)
        try:
            while not self.should_exit:
                await asyncio.sleep(TICK_S)
                self.tick()
        finally:
            await self.shutdown(lifespan)

    async def shutdown(self, lifespan: Lifespan | None) -> None:
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + self.limits.grace_s
        while (self.connections or self.tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self.tick()
        if self.tasks:
            log.error("stopping: %d request(s) still running after %.0f s are cancelled", len(self.tasks),
                      self.limits.grace_s)
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in list(self.connections):
            conn.transport.close()
        if lifespan is not None:
            await lifespan.shutdown()

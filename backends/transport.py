"""The lean keep-alive HTTP/1.1 client for self-hosted backends: a bounded pool per backend, an asyncio.Protocol
per connection, one httptools parser per response, per-phase timeouts, backpressure, abort on hang-up.

httpx costs 1.3-2.7 ms of CPU per request here; this costs tens of µs (reference/hot-path.md). It speaks only
what llama-server and SGLang need: one request at a time per connection, no pipelining, upgrades, proxies,
redirects, compression or streamed request bodies.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import httptools

from backends.errors import (
    BackendError,
    BackendFirstByteTimeoutError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnavailableError,
)

_HIGH_WATER_BYTES = 1 << 20  # pause the socket when the reader lags this far behind; resume once it drained
_SPLIT_WRITE_BYTES = 1 << 16  # a larger body is written on its own rather than copied onto the head
MAX_CHECKS = 3  # connection checks per request before the server counts as unavailable

log = logging.getLogger(__name__)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def head_fields(received: bytes, interim: int) -> list[tuple[str, str]]:
    """The (name, value) pairs of the head after `interim` 1xx heads in `received` (which starts with the response
    and holds its whole head), as httptools' on_header gives them, decoded as latin-1: llhttp accepted the head, so
    every line ends in CRLF, none folds, and a value loses only its leading blanks."""
    rest = received
    for _ in range(interim + 1):   # (llhttp skips empty lines before a message)
        head, _, rest = rest.lstrip(b"\r\n").partition(b"\r\n\r\n")
    fields = []
    for line in head.decode("latin-1").split("\r\n")[1:]:   # (after the status line)
        name, _, value = line.partition(":")
        fields.append((name, value.lstrip(" \t")))
    return fields


def _expire(waiter: asyncio.Future, make_error: Callable[[], BackendError]) -> None:
    if not waiter.done():
        waiter.set_exception(make_error())


class _Deadlines:
    """The response waits of one transport and when each runs out, checked by one timer that runs while any is
    pending, every `period_s` (a tenth of the shorter timeout, 10 ms to 1 s): a timer armed and cancelled per
    request cost more than parsing the response. A wait therefore ends up to `period_s` after its deadline."""

    __slots__ = ("pending", "period_s", "_loop", "_timer")

    def __init__(self, period_s: float) -> None:
        self.pending: dict[asyncio.Future, tuple[float, Callable[[], BackendError]]] = {}
        self.period_s = period_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, waiter: asyncio.Future, deadline: float, make_error: Callable[[], BackendError],
              loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
        """Watched here, or (a wait on another loop than the sweeping one) by a timer of its own, returned."""
        if loop is not self._loop and self._timer is not None:
            if not self._loop.is_closed():
                return loop.call_at(deadline, _expire, waiter, make_error)
            self.pending.clear()   # (what a closed loop left behind)
            self._timer = None
        if self._timer is None:
            self._loop = loop
            self._timer = loop.call_later(self.period_s, self._sweep)
        self.pending[waiter] = (deadline, make_error)
        return None

    def _sweep(self) -> None:
        pending = self.pending
        if not pending:
            self._timer = None
            return
        now = self._loop.time()
        for waiter, (deadline, make_error) in list(pending.items()):
            if deadline <= now:
                del pending[waiter]
                _expire(waiter, make_error)
        self._timer = self._loop.call_later(self.period_s, self._sweep)   # (it stops once nothing is pending)


class UpstreamResponse:
    """One response: status and headers once the head arrived, then the body as pieces.

    The connection goes back to its pool the moment the body ended (pieces stay buffered here). If the caller
    stops before that (cancel, error, aclose), the socket is aborted so the backend sees the hang-up at once.

    Timeouts: one first-byte deadline runs from sending the request until the first event, not just the head
    (SGLang sends a stream's head before prefill): `read()` ends it at the first body piece, a streaming
    consumer with `first_event_received()`. After that each wait gets the idle timeout.
    """

    __slots__ = (
        "status", "_headers", "_head", "_interim", "_conn", "_owner", "_parser", "_no_body", "_pieces",
        "_buffered", "_head_done", "_done", "_until_close", "_keep_alive", "_extra", "_received", "_error", "_waiter",
        "_deadline", "_first_pending", "_keep_conn", "_loop",
    )

    def __init__(self, conn: _Connection, owner: LeanTransport, no_body: bool, keep_conn: bool = False) -> None:
        self._keep_conn = keep_conn  # at its end the connection stays with the caller (a connection check)
        self.status = 0
        # the bytes received until the head ended: `headers` parses and decodes them when someone asks (an error, a
        # stream's content type), not for every reply. No on_header callback: httptools calls none when the target
        # has none, and each one cost more than the whole lazy parse.
        self._head = b""
        self._interim = 0  # 1xx heads before the real one
        self._headers: dict[str, str] | None = None
        self._conn: _Connection | None = conn
        self._owner = owner
        # the connection's loop: asyncio.get_running_loop() costs a getpid() system call on CPython 3.11
        self._loop: asyncio.AbstractEventLoop = conn.loop or asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._no_body = no_body  # HEAD: llhttp cannot be told, so the head alone ends the message
        self._pieces: list[bytes] = []
        self._buffered = 0
        # _extra: bytes past the end of the message, so the connection is out of step and can't be reused
        self._head_done = self._done = self._until_close = self._keep_alive = self._extra = self._received = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._deadline = 0.0  # loop time at which the first-byte budget runs out
        self._first_pending = True

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased names; a repeated header's values joined with ", "."""
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
            for name, text in head_fields(self._head, self._interim):
                key = name.lower()
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return headers

    async def read(self) -> bytes:
        """The whole body (chunked decoding done); consumes it."""
        if self._done and self._error is None:   # all here already (a small reply comes with its head)
            pieces, self._pieces = self._pieces, []
            self._abandon()
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        parts = []
        try:
            while (piece := await self._next_piece()) is not None:
                parts.append(piece)
                self._first_pending = False
        finally:
            self._abandon()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def first_event_received(self) -> None:
        """The consumer has its first event: the first-byte deadline is over, the idle timeout takes over."""
        self._first_pending = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive: everything buffered since the last piece, never split into lines."""
        try:
            while (piece := await self._next_piece()) is not None:
                yield piece
        finally:
            self._abandon()

    async def aclose(self) -> None:
        self._abandon()

    # httptools callbacks, called inside feed_data

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim head we never asked for; the real one follows
            self._interim += 1
            return
        self.status = status
        self._head_done = True
        # llhttp says keep-alive only for a message it can frame (content-length or chunked), so only a response
        # that ends its connection needs its headers read here
        self._keep_alive = keep_alive = self._parser.should_keep_alive()
        if self._no_body:
            self._done = True
        elif not keep_alive and status not in (204, 304):
            headers = self.headers
            self._until_close = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")

    def on_body(self, body: bytes) -> None:
        if self._done:
            self._extra = True
            return
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER_BYTES:
            self._conn.pause()

    def on_message_complete(self) -> None:
        if self._head_done:
            self._done = True

    # driven by the connection

    def _feed(self, data: bytes) -> None:
        self._received = True
        if not self._head_done:   # (the parser has checked these bytes by the time anyone reads them)
            self._head = self._head + data if self._head else data
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if not self._done:
                self._fail(BackendProtocolError("malformed HTTP response", backend=self._owner.backend))
                return
            self._extra = True
        if self._done:
            self._finish()
        self._wake()

    def _lost(self) -> None:
        backend = self._owner.backend
        if self._head_done and self._until_close:  # a read-until-close body ends at EOF
            self._done, self._conn, self._parser = True, None, None
            self._wake()
        elif not self._received:  # nothing came back: unavailable, and retryable if it was a stale keep-alive
            self._fail(BackendUnavailableError("connection closed before the response", backend=backend))
        else:
            where = "before the body ended" if self._head_done else "inside the response head"
            self._fail(BackendProtocolError(f"connection closed {where}", backend=backend))

    async def _start(self, head: bytes, body: bytes) -> None:
        """Send the request and wait for the response head."""
        conn = self._conn
        conn.response = self
        self._deadline = self._loop.time() + self._owner.first_byte_timeout_s
        if conn.dead:  # died between the pool and here: same as a stale keep-alive
            self._lost()
        else:
            conn.send(head, body)
        try:
            while not self._head_done:
                if self._error is not None:
                    raise self._error
                await self._wait(self._deadline, self._first_byte_error)
        except BaseException:
            self._abandon()
            raise

    async def _next_piece(self) -> bytes | None:
        while not self._pieces:
            if self._done:
                return None
            if self._error is not None:
                raise self._error
            if self._first_pending:
                await self._wait(self._deadline, self._first_byte_error)
            else:
                await self._wait(self._loop.time() + self._owner.idle_timeout_s, self._idle_error)
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    # iter_bytes() one piece at a time, None at the end, without an async generator between (RelayReply.events);
    # the caller's aclose() abandons what is left of the body
    next_piece = _next_piece

    async def _wait(self, deadline: float, make_error: Callable[[], BackendError]) -> None:
        """Until the connection has news for this response, or `deadline` (loop time) passes."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        deadlines = self._owner._deadlines
        timer = deadlines.watch(waiter, deadline, make_error, loop)
        try:
            await waiter
        finally:
            if timer is None:
                deadlines.pending.pop(waiter, None)
            else:
                timer.cancel()
            self._waiter = None

    def _first_byte_error(self) -> BackendError:
        owner = self._owner
        message = f"first byte timeout ({owner.first_byte_timeout_s}s)"
        return BackendFirstByteTimeoutError(message, backend=owner.backend)

    def _idle_error(self) -> BackendError:
        owner = self._owner
        return BackendTimeoutError(f"idle timeout ({owner.idle_timeout_s}s)", backend=owner.backend)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self) -> None:
        """The message ended: detach, and pool the connection if it can carry another request."""
        self._parser = None  # the parser holds this response as its callback target: break the cycle
        conn, self._conn = self._conn, None
        conn.response = None
        if self._keep_alive and not self._until_close and not self._extra:
            if not self._keep_conn:
                conn._pool.release(conn)
        else:
            conn.close()

    def _fail(self, error: BackendError) -> None:
        self._parser = None
        if self._error is None:
            self._error = error
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response = None
            conn.close()
        self._wake()

    def _abandon(self) -> None:
        """The caller is done with this response: if the body has not ended, abort the socket."""
        if self._conn is not None:
            self._fail(BackendProtocolError("response closed before the body ended", backend=self._owner.backend))


class _Connection(asyncio.Protocol):
    """One TCP connection: hands received bytes to the response in flight; frees its pool slot once when it dies."""

    __slots__ = ("transport", "response", "reused", "checked", "dead", "loop", "_pool", "_paused")

    def __init__(self, pool: _Pool) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None   # the loop it runs on, once connected
        self.response: UpstreamResponse | None = None
        self.reused = False
        self.checked = False
        self.dead = False
        self._pool = pool
        self._paused = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests and SSE events must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is out of step
            self.close()
        else:
            response._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.dead:
            self.dead = True
            self._pool.forget(self)
        if self.response is not None:
            self.response._lost()

    def send(self, head: bytes, body: bytes) -> None:
        if len(body) > _SPLIT_WRITE_BYTES:
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head + body)

    def pause(self) -> None:
        if not self._paused and not self.dead:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:  # when the reader drained the buffer, or the connection goes back to the pool
        if self._paused and not self.dead:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Abort at once (no flush, no lingering): this is how a hang-up reaches the backend."""
        if not self.dead:
            self.dead = True
            if self.transport is not None:
                self.transport.abort()
            self._pool.forget(self)


class _Pool:
    """At most `max_connections` open connections: idle ones (LIFO, the warmest is least likely stale) and
    callers waiting for one. A waiter is handed either a released connection or a free slot (None)."""

    def __init__(self, connect: Callable[[_Connection], Awaitable[None]], max_connections: int,
                 wait_timeout_s: float, backend: str) -> None:
        self._connect, self._max = connect, max_connections
        self._wait_timeout_s, self._backend = wait_timeout_s, backend
        self._idle: collections.deque[_Connection] = collections.deque()
        # how many of them are checked, kept as they come and go (a connection is checked before it is ever idle):
        # asked for on every request of a backend that keeps checked connections ready
        self._idle_checked = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._open = 0
        self.closed = False

    async def acquire(self, fresh: bool) -> _Connection:
        """A live connection; `fresh` skips idle ones (after one turned out stale)."""
        if self.closed:
            raise BackendUnavailableError("transport closed", backend=self._backend)
        if self._idle and not fresh:
            return self._pop_idle()
        if fresh and self._idle and self._open >= self._max:
            conn = self._idle.popleft()
            self._idle_checked -= conn.checked
            conn.close()  # make room; its slot goes to the longest waiter, maybe us
        if self._open < self._max:
            self._open += 1
            return await self._open_connection()
        conn = await self._wait()
        if conn is None:
            return await self._open_connection()
        return conn if not conn.dead else await self.acquire(fresh)

    def take_idle(self) -> _Connection | None:
        """The warmest idle connection, without a coroutine (the common case); None: acquire() it."""
        if self._idle and not self.closed:
            return self._pop_idle()
        return None

    def _pop_idle(self) -> _Connection:
        conn = self._idle.pop()
        self._idle_checked -= conn.checked
        return conn

    def release(self, conn: _Connection) -> None:
        """A connection whose response ended cleanly: to the longest waiter, else idle."""
        conn.resume()
        if self.closed:
            conn.close()
            return
        conn.reused = True
        if not self._hand_over(conn):
            self._idle.append(conn)
            self._idle_checked += conn.checked

    def forget(self, conn: _Connection) -> None:
        """A connection died: drop it from idle and pass its slot on."""
        if conn in self._idle:
            self._idle.remove(conn)
            self._idle_checked -= conn.checked
        self._free_slot()

    def close_idle(self) -> None:
        while self._idle:
            self._pop_idle().close()

    def reserve(self) -> bool:
        """A slot for a connection opened ahead of need, when one is free now (never waits, never takes a slot a
        caller is waiting for)."""
        if self.closed or self._open >= self._max:
            return False
        self._open += 1
        return True

    async def open_reserved(self) -> _Connection:
        return await self._open_connection()

    def idle_checked(self, enough: int) -> int:
        """How many idle connections are checked, counting up to `enough`."""
        return min(self._idle_checked, enough)

    def close(self) -> None:
        self.closed = True
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(BackendUnavailableError("transport closed", backend=self._backend))
        while self._idle:
            self._pop_idle().close()

    async def _open_connection(self) -> _Connection:
        conn = _Connection(self)
        try:
            await self._connect(conn)
        except BaseException:
            conn.close()  # frees the slot exactly once, whatever connection_lost did meanwhile
            raise
        return conn

    async def _wait(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        backend = self._backend
        timer = loop.call_later(
            self._wait_timeout_s, _expire, waiter,
            lambda: BackendUnavailableError("connection pool exhausted", backend=backend),
        )
        try:
            return await waiter
        except BaseException:
            self._withdraw(waiter)
            raise
        finally:
            timer.cancel()

    def _withdraw(self, waiter: asyncio.Future) -> None:
        """A waiter gave up (timeout, cancel): take it out of line and pass on anything it was just handed."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            conn = waiter.result()
            if conn is None:
                self._free_slot()
            elif not conn.dead:
                self.release(conn)

    def _free_slot(self) -> None:
        if not self._hand_over(None):
            self._open -= 1

    def _hand_over(self, conn: _Connection | None) -> bool:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False


class LeanTransport:
    """A pooled HTTP/1.1 client for one backend. request() returns at the response head; the caller then reads
    the body to its end or acloses the response.

    Per-request headers are added to `default_headers` (a name in both is sent once, the request's value).
    Host, Connection and Content-Length belong to the transport.

    Health probes (`probe()`) have a pool of their own, one connection, and their own timeout: a backend whose
    data-plane pool is full of slow streams still answers them."""

    def __init__(
        self, base_url: str, *, max_connections: int = 100, connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 300.0, idle_timeout_s: float = 300.0, health_timeout_s: float = 25.0,
        default_headers: Mapping[str, str] | None = None, backend: str = "",
    ) -> None:
        url = urlsplit(base_url)
        self.base_url = base_url
        # A GET sent first on every new connection, its (status, body) handed to connection_check, which may
        # raise: a restarted server drops every connection, so this sees each new server instance before
        # any request does (llama.cpp's adapter ids, issue 13).
        self.check_path: str | None = None
        self.connection_check: Callable[[int, bytes], None] | None = None
        # Checked connections kept ready beside the requests, opened and checked in the background. llama-server
        # closes the connection after every streamed response and answers the check from its task queue, after
        # the batch step in progress: checked inline, every stream waited one step (up to hundreds of ms under
        # load) for its check (bench/gpu, 2026-12-01). A live checked connection still reaches the server that
        # answered its check (a restart drops it), so using one later is as safe as checking then.
        self.ready_checked = 0
        self.check_headers: Mapping[str, str] | None = None   # what the check sends when no request asks for it
        self._readying: set[asyncio.Task] = set()
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("base_url must look like http(s)://host[:port][/prefix]")
        tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if tls else 80)
        self._ssl = ssl.create_default_context() if tls else None
        self._prefix = url.path.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.health_timeout_s = health_timeout_s
        self.backend = backend
        host = url.netloc.rpartition("@")[2]  # never send userinfo
        self._defaults = {"host": ("Host", host), "connection": ("Connection", "keep-alive")}
        for name, value in (default_headers or {}).items():
            self._defaults[name.lower()] = (name, value)
        self._default_block = self._encode_defaults(frozenset())
        self._default_type = "content-type" in self._defaults
        self._lines: dict[tuple[str, str], bytes] = {}
        self._pool = _Pool(self._connect, max_connections, connect_timeout_s, backend)
        self._probe_pool = _Pool(self._connect, 1, connect_timeout_s, backend)
        self._deadlines = _Deadlines(min(1.0, max(0.01, min(first_byte_timeout_s, idle_timeout_s) / 10)))

    async def request(
        self, method: str, path: str, body: bytes | Callable[[], bytes] = b"",
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        return await self._send(self._pool, method, path, body, headers)

    async def probe(self, path: str, headers: Mapping[str, str] | None = None) -> int:
        """GET `path` outside the data-plane pool, the whole exchange bounded by the health timeout: the status."""
        try:
            async with asyncio.timeout(self.health_timeout_s):
                response = await self._send(self._probe_pool, "GET", path, b"", headers)
                await response.read()
        except TimeoutError as exc:
            raise BackendTimeoutError(f"health timeout ({self.health_timeout_s}s)", backend=self.backend) from exc
        return response.status

    async def _send(
        self, pool: _Pool, method: str, path: str, body: bytes | Callable[[], bytes],
        headers: Mapping[str, str] | None,
    ) -> UpstreamResponse:
        """`body` may be a function: it is called once a checked connection is in hand, so that what it
        builds (llama.cpp's adapter ids) matches the server that connection reaches."""
        build = body if callable(body) else None
        head = self._encode_head(method, path, body, headers) if build is None else b""
        fresh, checks = False, 0
        while True:
            conn = (None if fresh else pool.take_idle()) or await pool.acquire(fresh)
            if self.check_path is not None and not conn.checked and pool is self._pool:
                conn.checked = True
                checks += 1
                if not await self._check(conn, headers):  # the server closed it after the check: a new one, a few times
                    if checks >= MAX_CHECKS:
                        raise BackendUnavailableError("the server closes every new connection", backend=self.backend)
                    fresh = True
                    continue
            if self.ready_checked and pool is self._pool:
                self._keep_ready()
            if build is not None:
                try:
                    body = build()
                except BaseException:
                    pool.release(conn)  # nothing was sent on it
                    raise
                head = self._encode_head(method, path, body, headers)
            response = UpstreamResponse(conn, self, method == "HEAD")
            try:
                await response._start(head, body)
                return response
            except BackendUnavailableError:
                # A reused connection that died before any response byte was most likely closed by the server
                # while idle (stale keep-alive): retry once on a new one. Never once a response byte arrived.
                if fresh or not conn.reused or response._received:
                    raise
                fresh = True

    async def aclose(self) -> None:
        for task in list(self._readying):
            task.cancel()
        self._pool.close()
        self._probe_pool.close()

    def close_idle(self) -> None:
        """Close the pooled idle connections (before the server restarts: llama-server's shutdown waits for its
        keep-alive connections)."""
        self._pool.close_idle()

    def _keep_ready(self) -> None:
        """A request took a connection: open and check more in the background until `ready_checked` are idle or
        on their way (only in free slots: a request never waits for one of these)."""
        missing = self.ready_checked - len(self._readying) - self._pool.idle_checked(self.ready_checked)
        for _ in range(missing):
            if not self._pool.reserve():
                return
            task = asyncio.get_running_loop().create_task(self._ready_one())
            self._readying.add(task)
            task.add_done_callback(self._readying.discard)

    async def _ready_one(self) -> None:
        conn = None
        try:
            conn = await self._pool.open_reserved()
            conn.checked = True
            reusable = await self._check(conn, self.check_headers)
        except BackendError as exc:  # a changed server was noted by the check; the next request checks its own
            log.debug("%s: a connection readied ahead failed: %s", self.backend, exc)
            return
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if reusable:
            self._pool.release(conn)

    async def _check(self, conn: _Connection, headers: Mapping[str, str] | None) -> bool:
        """The check's GET on the new connection, which stays ours for the request; False when it did not
        survive the check. A raising connection_check hands the connection back to the pool first."""
        response = UpstreamResponse(conn, self, False, keep_conn=True)
        await response._start(self._encode_head("GET", self.check_path, b"", headers), b"")  # the caller's key too
        body = await response.read()
        reusable = not (conn.dead or conn.response is not None or conn.transport is None
                        or conn.transport.is_closing())
        try:
            if self.connection_check is not None:
                self.connection_check(response.status, body)
        except BaseException:
            if reusable:
                conn.close()  # a connection whose check failed is never used
            raise
        return reusable

    async def _connect(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        server_hostname = self._host if self._ssl is not None else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await loop.create_connection(
                    lambda: conn, self._host, self._port, ssl=self._ssl, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            raise BackendTimeoutError("connect timeout", backend=self.backend) from exc
        except OSError as exc:
            raise BackendUnavailableError(f"connect failed ({type(exc).__name__})", backend=self.backend) from exc

    def _encode_head(self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None) -> bytes:
        block = self._default_block
        extra = ""
        has_type = self._default_type
        if headers:
            defaults = self._defaults
            overridden = None
            for name, value in headers.items():
                key = name.lower()
                if key in defaults:  # rare: the default block is rebuilt without it
                    overridden = {key} if overridden is None else overridden | {key}
                elif key == "content-type":
                    has_type = True
                extra += f"{name}: {value}\r\n"
            # one line per header: a CR or LF inside a name or value would smuggle a header or a request
            if extra.count("\n") != len(headers) or extra.count("\r") != len(headers):
                raise ValueError("line break in a header")
            if overridden is not None:
                block = self._encode_defaults(overridden)
        if body or method in _BODY_METHODS:
            extra += f"Content-Length: {len(body)}\r\n"
        if body and not has_type:
            extra += "Content-Type: application/json\r\n"
        line = self._lines.get((method, path))
        if line is None:
            line = self._request_line(method, path)
        return b"".join((line, block, extra.encode("latin-1"), b"\r\n"))

    def _request_line(self, method: str, path: str) -> bytes:
        """`METHOD /prefix/path HTTP/1.1`, kept for the paths a backend is sent (a handful)."""
        if " " in path or "\n" in path or "\r" in path:
            raise ValueError("space or line break in the path")
        line = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("ascii")
        if len(self._lines) < 64:
            self._lines[(method, path)] = line
        return line

    def _encode_defaults(self, skip: frozenset[str] | set[str]) -> bytes:
        lines = [f"{name}: {value}\r\n" for key, (name, value) in self._defaults.items() if key not in skip]
        return "".join(lines).encode("latin-1")

"""The SSE relay: bytes in, bytes out, `data: [DONE]` always last; and the client hang-up watcher.

A failure after the first byte can no longer change the status, so it becomes one OpenAI-shaped SSE
error event followed by `data: [DONE]` (STYLE.md convention 8), whatever raised it: a backend error
or a bug of ours. The relay returns the status the request counts as in the metrics (200 only for a
stream that ended cleanly; otherwise the `code` of the error event).
"""
from __future__ import annotations

import asyncio
import logging

from backends.errors import BackendError, BackendTimeoutError
from backends.openai_compat import StreamErrorEvent
from gateway.errors import InternalError, error_body, scrub
from gateway.http_server import DISCONNECT_EXTENSION

log = logging.getLogger(__name__)
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE_EVENT = b"data: [DONE]\n\n"


def error_event(exc: Exception, request_id: str) -> tuple[bytes, int]:
    """The error event and `[DONE]` a failed stream ends with, and the status it counts as. OpenAI's error
    object has `code` as a string or null, so the status is not put there."""
    if isinstance(exc, StreamErrorEvent) and exc.status < 500:
        code, body = exc.status, error_body(scrub(exc.message), "invalid_request_error")
    elif isinstance(exc, BackendTimeoutError):
        code, body = 504, error_body(f"The backend timed out during the stream: {scrub(exc.message)}",
                                     "server_error")
    elif isinstance(exc, BackendError):
        code, body = 502, error_body(f"The backend failed during the stream: {scrub(exc.message)}",
                                     "server_error")
    else:
        code, body = 500, error_body(InternalError(request_id).message, "server_error")
    return b"data: " + body + b"\n\n" + DONE_EVENT, code


class StreamHead:
    """A stream's response head, which a request that waits in the admission queue sends early, with SSE
    comments as keep-alives (so that clients and proxies do not time out an idle connection). After it, a
    failure can only be an SSE error event; and the x-kimi-* headers decided later are not sent."""

    __slots__ = ("send", "extra", "started")

    def __init__(self, send, extra: list[tuple[bytes, bytes]]) -> None:
        self.send, self.extra, self.started = send, extra, False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + self.extra})

    async def keepalive(self) -> None:
        await self.start()
        await self.send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def fail(self, error) -> int:
        """End a started stream with the GatewayError as its error event; the status it counts as."""
        await self.send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n" + DONE_EVENT,
                         "more_body": False})
        return error.status_code


KEEPALIVE = b": waiting for a backend slot\n\n"


async def relay_stream(send, first: bytes, events, reply, recorder, extra: list[tuple[bytes, bytes]],
                       request_id: str, head: StreamHead | None = None) -> int:
    """Head and first event go out back to back, before any further upstream read (no Nagle stall).
    Returns 200, or the code of the error event the stream ended with."""
    if head is None or not head.started:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + extra})
        if head is not None:
            head.started = True
    recorder.first_event()
    code, tail, relayed = 200, b"", 0
    try:
        await send({"type": "http.response.body", "body": first, "more_body": True})
        async for block in events:
            relayed += 1   # counted here, told to the recorder once (a call per event less)
            await send({"type": "http.response.body", "body": block, "more_body": True})
    except BackendError as exc:
        log.warning("stream %s from %s failed after the first byte: %s", request_id, exc.backend, exc.message)
        tail, code = error_event(exc, request_id)
    except Exception as exc:  # a bug of ours must still end the stream properly
        log.exception("stream %s failed after the first byte", request_id)
        tail, code = error_event(exc, request_id)
    finally:
        recorder.events(relayed)
        await reply.aclose()
    await send({"type": "http.response.body", "body": tail, "more_body": False})
    return code


WATCH_AFTER_S = 0.025   # how long a request runs before its hang-up watch starts (under a server without the extension)


class DisconnectWatcher:
    """Cancels the request's task when the client hangs up, so the upstream request is aborted at once.

    Under the gateway's own server (gateway/http_server.py) the server says so itself: the watcher registers a
    callback through the scope's `kimi.disconnect` extension, and the per-request cost is that one call.
    Elsewhere (uvicorn) ASGI says a hang-up only through receive(), so the watch is a task of its own, started once
    the request has run for WATCH_AFTER_S: a request answered sooner (most non-streaming ones behind a fast backend)
    costs a timer instead of a task, and a longer one (a generation, a stream) is aborted at most that much later.
    Once the response is complete the server's receive() answers `http.disconnect` by itself, so that watch
    ends on its own then: cancelling it instead would leave a traceback cycle per request for the GC.
    """

    __slots__ = ("disconnected", "done", "loop", "_receive", "_task", "_timer")

    def __init__(self, receive, loop: asyncio.AbstractEventLoop | None = None, scope: dict | None = None,
                 after_s: float = WATCH_AFTER_S) -> None:
        """`loop`: the loop the previous request ran on, if any: its current task is this request's when it is
        the running loop (asyncio.get_running_loop() costs a getpid() system call on CPython 3.11)."""
        self.disconnected = False
        self.done = False
        self._receive = receive
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:   # the first request, or another loop than the last one
            task = asyncio.current_task()
        self._task = task
        self.loop = loop = task.get_loop()
        extensions = scope.get("extensions") if scope is not None else None
        register = extensions.get(DISCONNECT_EXTENSION) if extensions else None
        if register is not None:
            self._timer = None
            register(self._hung_up)
        else:
            self._timer = loop.call_later(after_s, self._start)

    def _hung_up(self) -> None:
        if not self.done:
            self.disconnected = True
            self._task.cancel()

    def _start(self) -> None:
        self._timer = None
        if not self.done:
            self.loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    self.disconnected = True
                    self._task.cancel()
                self._task = None
                return

    def stop(self) -> None:
        """The response is complete (or the request failed): nothing left to cancel."""
        self.done = True
        self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

"""The SSE relay: bytes in, bytes out, `data: [DONE]` always last; and the client hang-up watcher.

A failure after the first byte can no longer change the status, so it becomes one OpenAI-shaped SSE
error event followed by `data: [DONE]` (STYLE.md convention 8).
"""
from __future__ import annotations

import asyncio
import logging

from backends.errors import BackendError
from backends.openai_compat import StreamErrorEvent
from gateway.errors import error_body, scrub

log = logging.getLogger(__name__)
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE_EVENT = b"data: [DONE]\n\n"


def error_event(exc: BackendError) -> bytes:
    """OpenAI's error object: `code` is a string or null in its schema, so the status is not put there."""
    if isinstance(exc, StreamErrorEvent) and exc.status < 500:
        body = error_body(scrub(exc.message), "invalid_request_error")
    else:
        body = error_body(f"The backend failed during the stream: {scrub(exc.message)}", "server_error")
    return b"data: " + body + b"\n\n" + DONE_EVENT


async def relay_stream(send, first: bytes, events, reply, recorder, extra: list[tuple[bytes, bytes]]) -> None:
    """Head and first event go out back to back, before any further upstream read (no Nagle stall)."""
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + extra})
    recorder.first_event()
    try:
        await send({"type": "http.response.body", "body": first, "more_body": True})
        async for block in events:
            recorder.event()
            await send({"type": "http.response.body", "body": block, "more_body": True})
        tail = b""
    except BackendError as exc:
        log.warning("stream from %s failed after the first byte: %s", exc.backend, exc.message)
        tail = error_event(exc)
    finally:
        await reply.aclose()
    await send({"type": "http.response.body", "body": tail, "more_body": False})


class DisconnectWatcher:
    """Cancels the request's task when the client hangs up, so the upstream request is aborted at once.

    Once the response is complete the server's receive() answers `http.disconnect` by itself, so the watch
    ends on its own then: cancelling it instead would leave a traceback cycle per request for the GC.
    """

    __slots__ = ("disconnected", "done", "_receive", "_task")

    def __init__(self, receive) -> None:
        self.disconnected = False
        self.done = False
        self._receive = receive
        self._task = asyncio.current_task()
        asyncio.get_running_loop().create_task(self._run())

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

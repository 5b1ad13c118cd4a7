"""Request ids: every answer carries `x-request-id`, the data plane's and the control plane's alike.

An incoming `x-request-id` (a load balancer's or the client's) is kept when it is well-formed: 1 to 128
characters of letters, digits and `._:-`. Anything else (empty, longer, a space, a quote, non-ASCII) is
replaced by a new id of 24 hex digits, never echoed. The data plane forwards the id to the backend.
"""
from __future__ import annotations

import random
import re
import time

from gateway.logs import REQUEST_ID

HEADER = b"x-request-id"
WELL_FORMED = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id_of(incoming: bytes | None) -> str:
    """The incoming id when well-formed, else a new one: unique, not secret (`random` is reseeded in a
    forked child, so worker processes never share a sequence)."""
    if incoming is not None and WELL_FORMED.fullmatch(incoming):
        return incoming.decode("ascii")
    return f"{random.getrandbits(96):024x}"


def incoming_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == HEADER:  # ASGI servers give header names lower-cased
            return value
    return None


class RequestIdApp:
    """Wraps an ASGI app (the control plane) so that each HTTP answer carries `x-request-id` and `Server-Timing`
    (all of its time is the gateway's), and each log line written while serving it the id (gateway/logs.py)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = request_id_of(incoming_id(scope["headers"]))
        REQUEST_ID.set(request_id)
        value = request_id.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, raw) for name, raw in message.get("headers", ()) if name.lower() != HEADER]
                timing = b"gateway;dur=%.3f" % ((time.perf_counter() - start) * 1e3)
                message = {**message, "headers": [*headers, (HEADER, value), (b"server-timing", timing)]}
            await send(message)

        await self.app(scope, receive, send_with_id)

"""Plumbing shared by the SGLang and Moonshot emulators.

Owns: JSON and SSE framing, bearer-auth middleware, the request log, fault injection and the
test-only `/_emulator/*` endpoints. Nothing here knows a dialect: each emulator passes in its own
error bodies. The fake model output lives in `generation.py`.

Test-only API (both emulators; never authenticated):
- `POST /_emulator/faults` queues one fault that applies to the next `count` chat/completions
  requests: `{"status": 503, "count": 2}` (answer that status with the emulator's native error
  body; optional `"message"`, `"type"` override it), `{"raw_body": "<html>…", "status": 502}`
  (answer these bytes verbatim, `content_type` default text/html, status default 200: a proxy's
  error page, or a 200 that is not JSON), `{"delay_first_byte_s": 2.0}` (sleep before the response
  starts), `{"delay_prefill_s": 2.0}` (the request's prefill: a stream sends its response head at
  once and its first event after the delay; a non-stream answer comes after it),
  `{"drop_mid_stream_after": 3}` (send 3 SSE events, then cut the connection),
  `{"stream_error_after": 2}` (send 2 SSE events, then the native in-stream error event and
  `data: [DONE]`; `"stream_error_code": 500` picks the code that event carries, default 400). Keys
  may be combined in one fault. Stream-only faults wait for a streaming request. `"path"` aims a
  fault at another endpoint that takes faults (the SGLang emulator's `/load_lora_adapter`: status,
  raw_body, delay_first_byte_s). Queued faults are consumed first in, first out.
- `GET /_emulator/faults` lists pending faults; `GET /_emulator/requests` lists chat/completions
  requests received, newest last: `{"path", "body" (parsed JSON or null), "raw" (text when not
  JSON), "has_authorization", "headers" (minus authorization)}`.
- `POST /_emulator/reset` clears faults, the log and the emulator's own state.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SSE_DONE = b"data: [DONE]\n\n"
LOGGED_PATHS = ("/v1/chat/completions", "/v1/completions")


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json")


def sse_event(body: Any) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def read_json(request: Request) -> tuple[Any, bytes, str | None]:
    """(parsed body or None, raw bytes, parse error text or None)."""
    raw = await request.body()
    try:
        return orjson.loads(raw), raw, None
    except orjson.JSONDecodeError as exc:
        return None, raw, str(exc)


# --- auth ----------------------------------------------------------------------------------------

AuthCheck = Callable[[str | None, str], Response | None]


class BearerAuthMiddleware:
    """Pure ASGI: asks `check(authorization header, path)` and answers its response if it gives one.

    A rejected request to one of `logged_paths` still goes into `log`, so tests can see it.
    """

    def __init__(self, app: ASGIApp, check: AuthCheck, log: RequestLog | None = None,
                 logged_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.check = check
        self.log = log
        self.logged_paths = logged_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"authorization")
            rejection = self.check(raw.decode("latin-1") if raw is not None else None, scope["path"])
            if rejection is not None:
                if self.log is not None and scope["path"] in self.logged_paths:
                    request = Request(scope, receive)
                    body, raw_body, _ = await read_json(request)
                    self.log.record(request, body, raw_body)
                await rejection(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return authorization[7:].strip() or None


# --- request log ---------------------------------------------------------------------------------


class RequestLog:
    """Chat/completions requests as received, for tests to see what the gateway forwarded."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def record(self, request: Request, body: Any, raw: bytes) -> None:
        self.entries.append({
            "path": request.url.path,
            "body": body,
            "raw": None if body is not None else raw.decode("utf-8", "replace"),
            "has_authorization": "authorization" in request.headers,
            "headers": {k: v for k, v in request.headers.items() if k != "authorization"},
        })

    def clear(self) -> None:
        self.entries.clear()


# --- faults --------------------------------------------------------------------------------------


class EmulatedDisconnect(Exception):
    """Raised inside a response stream to cut the connection (`drop_mid_stream_after`)."""


@dataclass
class Fault:
    count: int = 1
    status: int | None = None
    message: str | None = None
    type: str | None = None
    delay_first_byte_s: float | None = None
    delay_prefill_s: float | None = None
    drop_mid_stream_after: int | None = None
    stream_error_after: int | None = None
    stream_error_code: int | None = None
    raw_body: str | None = None
    content_type: str | None = None
    path: str | None = None  # None: the next chat/completions requests

    @property
    def stream_only(self) -> bool:
        return (self.status is None and self.raw_body is None and self.delay_first_byte_s is None
                and self.delay_prefill_s is None)

    @classmethod
    def parse(cls, body: Any) -> Fault:
        """Validate a `POST /_emulator/faults` body; ValueError says what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("fault must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown fault keys: {unknown}")
        fault = cls(**body)
        effects = (fault.status, fault.raw_body, fault.delay_first_byte_s, fault.delay_prefill_s,
                   fault.drop_mid_stream_after, fault.stream_error_after)
        if all(effect is None for effect in effects):
            raise ValueError("a fault needs status, raw_body, delay_first_byte_s, delay_prefill_s, "
                             "drop_mid_stream_after or stream_error_after")
        if not isinstance(fault.count, int) or fault.count < 1:
            raise ValueError("count must be an integer >= 1")
        if fault.stream_error_code is not None and fault.stream_error_after is None:
            raise ValueError("stream_error_code goes with stream_error_after")
        if fault.content_type is not None and fault.raw_body is None:
            raise ValueError("content_type goes with raw_body")
        return fault

    @property
    def prefill_s(self) -> float:
        return self.delay_prefill_s or 0.0


class FaultInjector:
    """Queued faults; `take` hands the next applicable one to a request and counts it down."""

    def __init__(self, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.pending: list[Fault] = []
        self.sleep = sleep

    def add(self, fault: Fault) -> None:
        self.pending.append(fault)

    def take(self, stream: bool, path: str | None = None) -> Fault | None:
        """The next fault for a request to `path`: a fault without a path applies to both OpenAI endpoints,
        one with a path (`/v1/chat/completions`, `/load_lora_adapter`, ...) to that path only."""
        for fault in self.pending:
            applies = path in LOGGED_PATHS if fault.path is None else fault.path == path
            if not applies or (fault.stream_only and not stream):
                continue
            fault.count -= 1
            if fault.count == 0:
                self.pending.remove(fault)
            return fault
        return None

    async def delay(self, fault: Fault | None) -> None:
        if fault is not None and fault.delay_first_byte_s:
            await self.sleep(fault.delay_first_byte_s)

    def clear(self) -> None:
        self.pending.clear()


def raw_response(fault: Fault) -> Response:
    """`raw_body`: the bytes as given, e.g. an HTML error page from a proxy in front of the server."""
    return Response(fault.raw_body.encode(), status_code=fault.status or 200,
                    media_type=fault.content_type or "text/html")


async def faulty_events(events: Iterable[bytes], fault: Fault | None, error_event: bytes,
                        before_first: Callable[[], Awaitable[Any]] | None = None,
                        interval_s: float = 0.0) -> AsyncIterator[bytes]:
    """Yield SSE events, applying a drop or an in-stream error after N events.

    `before_first` runs inside the body, after the response head went out: the prefill.
    """
    if before_first is not None:
        await before_first()
    drop_after = fault.drop_mid_stream_after if fault else None
    error_after = fault.stream_error_after if fault else None
    for position, event in enumerate(events):
        if drop_after is not None and position >= drop_after:
            raise EmulatedDisconnect(f"connection dropped after {drop_after} events")
        if error_after is not None and position >= error_after:
            yield error_event
            yield SSE_DONE
            return
        yield event
        await asyncio.sleep(interval_s)  # 0: just let others run


class QuietDisconnects:
    """Runner-only ASGI wrapper: an `EmulatedDisconnect` ends the app without a traceback.

    The server then closes the connection mid-body (uvicorn logs one line); in-process tests use
    the bare app and see the exception instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except EmulatedDisconnect:
            return


def sse_response(events: Iterable[bytes], fault: Fault | None, error_event: bytes,
                 before_first: Callable[[], Awaitable[Any]] | None = None) -> StreamingResponse:
    return StreamingResponse(faulty_events(events, fault, error_event, before_first), media_type="text/event-stream")


# --- the /_emulator router -----------------------------------------------------------------------


def emulator_router(faults: FaultInjector, log: RequestLog, on_reset: Callable[[], None]) -> APIRouter:
    router = APIRouter(prefix="/_emulator")

    @router.post("/faults")
    async def add_fault(request: Request) -> Response:
        body, _, error = await read_json(request)
        try:
            if error is not None:
                raise ValueError(f"invalid JSON: {error}")
            faults.add(Fault.parse(body))
        except (TypeError, ValueError) as exc:
            return json_response({"detail": str(exc)}, 400)
        return json_response({"pending": [asdict(f) for f in faults.pending]})

    @router.get("/faults")
    async def list_faults() -> Response:
        return json_response({"pending": [asdict(f) for f in faults.pending]})

    @router.get("/requests")
    async def list_requests() -> Response:
        return json_response(log.entries)

    @router.post("/reset")
    async def reset() -> Response:
        faults.clear()
        log.clear()
        on_reset()
        return json_response({"reset": True})

    return router


async def intake(request: Request, log: RequestLog, faults: FaultInjector) -> tuple[Any, str | None, Fault | None]:
    """Read and log a chat/completions request and take its fault: (body, JSON error, fault)."""
    body, raw, error = await read_json(request)
    log.record(request, body, raw)
    stream = isinstance(body, dict) and body.get("stream") is True
    return body, error, faults.take(stream=stream, path=request.url.path)


def emulator_app(title: str, check: AuthCheck, state, *routers: APIRouter, lifespan=None) -> FastAPI:
    """An emulator's app: bearer auth by the dialect's `check`, the test-only `/_emulator/*` endpoints on its
    state's faults and log, then the dialect's routers. `state` has `faults`, `log` and `reset()`."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BearerAuthMiddleware, check=check, log=state.log, logged_paths=LOGGED_PATHS)
    app.include_router(emulator_router(state.faults, state.log, state.reset))
    for router in routers:
        app.include_router(router)
    return app


def runner_args(prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line every emulator starts with: `python -m <prog> --port N [--host H]`."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    return parser

"""create_app(config): the composition root. A plain ASGI front sends the two data-plane paths to the
lean handler and everything else (control plane) to FastAPI; the lifespan opens and closes the drivers."""
from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from functools import partial

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from adapters.store import StoreUnavailableError
from adapters.validation import AdapterValidationError
from backends.base import BackendDriver
from backends.protocol import CHAT_PATH, COMPLETIONS_PATH
from gateway.api import admin, experiments, health, models
from gateway.api.openapi import data_plane_paths
from gateway.config import ConfigError, GatewayConfig, describe_error, key_path
from gateway.control_body import ControlBodyCheck
from gateway.dataplane import DataPlane, send_error
from gateway.errors import (
    ERROR_TABLE,
    GatewayError,
    InternalError,
    MethodNotAllowedError,
    UnprocessableEntityError,
    error_body,
    to_gateway_error,
)
from gateway.exposure import admin_listener_paths, exposed, on_admin_listener, shared_paths
from gateway.logs import REQUEST_ID
from gateway.request_id import RequestIdApp, incoming_id, request_id_of
from gateway.state import GatewayState, build_state

log = logging.getLogger(__name__)
DATA_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})
GC_YOUNG_THRESHOLD = 10_000   # CPython's default is 700 allocations


def control_plane(state: GatewayState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await state.start()
        except STARTUP_PROBLEMS as exc:
            state.startup_error = f"cannot start: {startup_problem(exc)}"
            raise
        # Everything built so far lives as long as the process: keep the cyclic GC from walking it on
        # every full collection (those walks were the 25-50 ms pauses under load, bench/README.md).
        gc.collect()
        gc.freeze()
        # A young-generation collection walks every container allocated since the last one that is still
        # alive: under load, the objects of every request in flight. Most of a request's objects are freed by
        # reference counting, never by the collector, so collecting 10,000 allocations apart instead of 700
        # does the same work ~14x less often (bench/README.md, round 4).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            state.draining = True
            await state.aclose()

    app = FastAPI(title="kimi-gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = state
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(experiments.admin_router)
    app.include_router(experiments.feedback_router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="0.1.0", routes=app.routes)
            schema["paths"] = {**data_plane_paths(), **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(exposed("openapi"))])
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> Response:
        return Response(exc.body(), status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    async def table_error(request: Request, exc: Exception) -> Response:
        """An error from below (a store that is away, a backend) that a handler let through: its row of the table."""
        return await gateway_error(request, to_gateway_error(exc))

    for kind, _ in ERROR_TABLE:
        app.add_exception_handler(kind, table_error)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        """A bug: the OpenAI-shaped 500 with the request id (the server logs the traceback), never its text."""
        error = InternalError(REQUEST_ID.get() or "unknown")
        return Response(error.body(), status_code=500, media_type="application/json")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:   # every method the path takes, not only those of the first route matched
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
            headers["allow"] = allowed_methods(app, request.scope)
        return Response(error_body(str(exc.detail), kind), status_code=exc.status_code, media_type="application/json",
                        headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        error = invalid_body(exc.errors()[0])
        return Response(error.body(), status_code=error.status_code, media_type="application/json")

    return app


STARTUP_PROBLEMS = (StoreUnavailableError, ConfigError, AdapterValidationError, OSError)


def startup_problem(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def invalid_body(error: dict) -> UnprocessableEntityError:
    """A body field that failed its model, named by its key path (the value itself is never echoed)."""
    loc = tuple(part for part in error.get("loc", ()) if part != "body")
    if not loc and error.get("type") == "missing":
        return UnprocessableEntityError("Invalid request: the body is required (a JSON object).")
    return UnprocessableEntityError(f"Invalid request: {describe_error({**error, 'loc': loc})}",
                                    param=key_path(loc) or None)


def authorize_body(state: GatewayState, scope) -> None:
    """The key check of the handlers that take a body, made before their body is read (gateway/control_body.py)."""
    request = Request(scope)
    if scope["path"].startswith("/admin"):
        admin.require_admin(request, state)
    else:
        experiments.feedback_caller(request, state)


METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, scope) -> str:
    """The methods some route takes at this path (asked of the routes, however FastAPI nests routers); HEAD
    wherever GET is (`as_get`)."""
    return ", ".join(method for method in METHODS if any(
        route.matches({**scope, "method": "GET" if method == "HEAD" else method})[0] is Match.FULL
        for route in app.router.routes))


def as_get(scope, send):
    """HEAD is answered as GET, without the body: the GET's status and headers (its content-length included)
    reach the client, its body bytes do not (RFC 9110 9.3.2). The control plane's routes declare GET only."""
    async def send_head(message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)
    return {**scope, "method": "GET"}, send_head


class GatewayApp:
    """The ASGI entry point: the data plane never touches FastAPI. With `admin_listen` set, that port serves
    /admin and the introspection that `exposure` makes admin-only, and the main port serves everything else;
    /readyz is on both when its details are admin-only (its status for load balancers, its details on admin)."""

    def __init__(self, state: GatewayState) -> None:
        config = state.config
        self.state = state
        self.data_plane = DataPlane(state)
        self.control = control_plane(state)
        self.split = config.admin_listen is not None
        self.admin_paths = admin_listener_paths(config)
        self.shared_paths = shared_paths(config)
        self.checked_control = ControlBodyCheck(self.control, partial(authorize_body, state))   # bodies: JSON, bounded, strict (gateway/control_body.py)
        self.front = RequestIdApp(self._control_or_not_found)   # the data plane sets its own request id

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path, on_admin = scope["path"], self.split and on_admin_listener(scope, self.state.config)
            if path in DATA_PATHS and not on_admin:
                if scope["method"] == "POST":
                    return await self.data_plane(scope, receive, send)
                request_id = request_id_of(incoming_id(scope["headers"])).encode()
                return await send_error(send, MethodNotAllowedError("POST"), [(b"x-request-id", request_id)])
        elif scope["type"] == "lifespan":
            send = self._one_line_startup_failure(send)
        return await self.front(scope, receive, send)

    def _one_line_startup_failure(self, send):
        """The server logs a failed start's message: for a known cause, one line instead of a traceback."""
        async def send_plain(message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.state.startup_error is not None:
                message = {**message, "message": self.state.startup_error}
            await send(message)
        return send_plain

    async def _control_or_not_found(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.split:
            path, on_admin = scope["path"], on_admin_listener(scope, self.state.config)
            if path not in self.shared_paths and on_admin != self._admin_side(path):
                return await not_found(send)
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope, send = as_get(scope, send)
        return await self.checked_control(scope, receive, send)

    def _admin_side(self, path: str) -> bool:
        return path.startswith("/admin") or path in self.admin_paths


async def not_found(send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": error_body("Not found.", "invalid_request_error")})


def create_app(config: GatewayConfig, drivers: dict[str, BackendDriver] | None = None) -> GatewayApp:
    return GatewayApp(build_state(config, drivers))

"""create_app(config): the composition root. A plain ASGI front sends the two data-plane paths to the
lean handler and everything else (control plane) to FastAPI; the lifespan opens and closes the drivers."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from backends.base import BackendDriver
from backends.protocol import CHAT_PATH, COMPLETIONS_PATH
from gateway.api import health, models
from gateway.config import GatewayConfig
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, InvalidRequestError, error_body
from gateway.state import GatewayState, build_state

log = logging.getLogger(__name__)
DATA_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})


def control_plane(state: GatewayState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            state.draining = True
            await state.aclose()

    app = FastAPI(title="kimi-gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = state
    app.include_router(models.router)
    app.include_router(health.router)

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> Response:
        return Response(exc.body(), status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return Response(error_body(str(exc.detail), kind), status_code=exc.status_code, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        error = InvalidRequestError(f"Invalid request: {exc.errors()[0].get('msg', 'malformed body')}")
        return Response(error.body(), status_code=400, media_type="application/json")

    return app


class GatewayApp:
    """The ASGI entry point: the data plane never touches FastAPI."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.data_plane = DataPlane(state)
        self.control = control_plane(state)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in DATA_PATHS:
            if scope["method"] == "POST":
                return await self.data_plane(scope, receive, send)
        return await self.control(scope, receive, send)


def create_app(config: GatewayConfig, drivers: dict[str, BackendDriver] | None = None) -> GatewayApp:
    return GatewayApp(build_state(config, drivers))

"""The admin API (bearer admin key): adapters and backends. With no admin key configured it refuses all."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from adapters.models import AdapterSpec
from adapters.registry import AdapterExistsError, AdapterNotFoundError
from adapters.validation import AdapterValidationError, validate_adapter
from gateway.auth import bearer, match_key
from gateway.config import check_adapter_references
from gateway.dependencies import StateDep
from gateway.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableAdapterError,
)
from gateway.state import GatewayState


def require_admin(request: Request, state: StateDep) -> None:
    if not state.admin_digests:
        raise PermissionDeniedError(f"The admin API is disabled: set {state.config.auth.admin_keys_env} "
                                    "to one or more comma-separated admin keys.")
    header = request.headers.get("authorization")
    presented = bearer(header.encode("latin-1") if header else None)
    if presented is None or match_key(presented, state.admin_digests) < 0:
        raise AuthenticationError("A valid admin key is required (Authorization: Bearer <admin key>).")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def adapter_view(state: GatewayState, spec: AdapterSpec) -> dict:
    loaded = {name: driver.adapters().get(spec.name, False) for name, driver in state.drivers.items()
              if name in spec.backends}
    return {**spec.model_dump(), "loaded": loaded}


@router.get("/adapters")
async def list_adapters(state: StateDep) -> dict:
    return {"data": [adapter_view(state, spec) for spec in state.adapters]}


@router.post("/adapters", status_code=201)
async def add_adapter(spec: AdapterSpec, state: StateDep) -> dict:
    try:
        check_adapter_references(spec, state.config, "adapter")
        await asyncio.to_thread(validate_adapter, spec.source, spec.gguf, state.config.adapter_roots)
    except (AdapterValidationError, ValueError) as exc:
        state.metrics.adapter_operations.labels("add", "invalid").inc()
        raise UnprocessableAdapterError(str(exc)) from exc
    if state.routes.get(spec.name) is not None and spec.name not in {a.name for a in state.adapters}:
        raise ConflictError(f"'{spec.name}' is already a route name.")
    async with state.registry.lock:
        try:
            await asyncio.to_thread(state.registry.add, spec)
        except AdapterExistsError as exc:
            raise ConflictError(str(exc)) from exc
        state.replan(state.adapters + [spec])
    state.metrics.adapter_operations.labels("add", "ok").inc()
    return adapter_view(state, spec)


@router.delete("/adapters/{name}", status_code=204)
async def remove_adapter(name: str, state: StateDep) -> Response:
    users = [route.name for route in state.routes.routes() if route.experiment and name in route.experiment.variants]
    if users:
        raise ConflictError(f"Adapter '{name}' is a variant of experiment(s) {users}; change them first.")
    async with state.registry.lock:
        try:
            await asyncio.to_thread(state.registry.remove, name)
        except AdapterNotFoundError as exc:
            raise NotFoundError(f"No adapter named '{name}'.") from exc
        state.replan([spec for spec in state.adapters if spec.name != name])
    state.metrics.adapter_operations.labels("remove", "ok").inc()
    return Response(status_code=204)


@router.get("/backends")
async def list_backends(state: StateDep) -> dict:
    return {"data": [{"name": backend.name, "kind": backend.kind, "up": state.healthy.get(backend.name, False),
                      "adapters": state.drivers[backend.name].adapters()} for backend in state.config.backends]}

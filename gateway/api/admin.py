"""The admin API (bearer admin key): adapters and backends. With no admin key configured it refuses all.
Handlers only check the request and call the adapter lifecycle; its errors map to statuses in gateway/errors.py."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from adapters.errors import AdapterError, AdapterExistsError, AdapterNotFoundError, AdapterValidationError
from adapters.lease import LeaseBusyError
from adapters.store import StoreUnavailableError
from adapters.models import AdapterSpec, SwapSpec
from gateway.auth import bearer, match_key
from gateway.config import check_adapter_references
from gateway.control_body import strict_body
from gateway.dependencies import StateDep
from gateway.errors import (
    AuthenticationError,
    ConflictError,
    PermissionDeniedError,
    UnprocessableAdapterError,
    to_gateway_error,
)
from gateway.state import GatewayState

LIFECYCLE_ERRORS = (AdapterError, AdapterExistsError, AdapterNotFoundError, AdapterValidationError,
                    StoreUnavailableError, LeaseBusyError)


def require_admin(request: Request, state: StateDep) -> None:
    if not state.admin_digests:
        raise PermissionDeniedError(f"The admin API is disabled: set {state.config.auth.admin_keys_env} "
                                    "to one or more comma-separated admin keys.")
    header = request.headers.get("authorization")
    presented = bearer(header.encode("latin-1") if header else None)
    if presented is None or match_key(presented, state.admin_digests) < 0:
        raise AuthenticationError("A valid admin key is required (Authorization: Bearer <admin key>).")


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.get("/adapters")
async def list_adapters(state: StateDep) -> dict:
    return {"data": state.lifecycle.views()}


@router.get("/adapters/{name}")
async def show_adapter(name: str, state: StateDep) -> dict:
    try:
        return state.lifecycle.view(name)
    except LIFECYCLE_ERRORS as exc:
        raise to_gateway_error(exc) from exc


@router.post("/adapters", status_code=201, dependencies=[strict_body(AdapterSpec)])
async def add_adapter(spec: AdapterSpec, state: StateDep) -> dict:
    try:
        check_adapter_references(spec, state.config, "adapter")
    except ValueError as exc:
        state.lifecycle.events.adapter_operation("add", "invalid")
        raise UnprocessableAdapterError(str(exc)) from exc

    def not_a_route(routes: list) -> None:
        if spec.name in {route.name for route in routes}:
            raise ConflictError(f"'{spec.name}' is already a route name.")

    async def add() -> None:
        # The name is claimed while it is checked and registered: no route change may take it meanwhile.
        async with state.experiments.claiming(spec.name, not_a_route):
            await state.lifecycle.register(spec)
    try:
        await asyncio.shield(add())  # an admin who hangs up does not cut it in half
        return state.lifecycle.view(spec.name)
    except LIFECYCLE_ERRORS as exc:
        state.lifecycle.events.adapter_operation("add", "error")
        raise to_gateway_error(exc) from exc


@router.post("/adapters/{name}/swap", dependencies=[strict_body(SwapSpec)])
async def swap_adapter(name: str, swap: SwapSpec, state: StateDep) -> dict:
    if swap.source is None and swap.gguf is None:
        raise UnprocessableAdapterError("A swap needs the new version's `source` (PEFT dir) and/or `gguf`.")
    try:
        if problem := swap_problem(state.lifecycle.view(name), swap.source, swap.gguf, state):
            raise UnprocessableAdapterError(problem, param="source" if swap.source is None else "gguf")
        changed = await asyncio.shield(state.lifecycle.swap(name, swap.source, swap.gguf))
        return {**state.lifecycle.view(name), "changed": changed}
    except LIFECYCLE_ERRORS as exc:
        state.lifecycle.events.adapter_operation("swap", "error")
        raise to_gateway_error(exc) from exc


def swap_problem(view: dict, source: str | None, gguf: str | None, state: GatewayState) -> str | None:
    """A swap keeps the files it does not give: a backend that would go on loading its old file under the new
    version's label (a llama.cpp backend given only a new `source` would serve the old `gguf`) is a problem."""
    given = {"source": source, "gguf": gguf}
    for name in view["backends"]:
        backend = next((b for b in state.config.backends if b.name == name), None)
        artifact = backend.adapter_artifact if backend is not None else None
        if artifact is not None and given[artifact] is None and view[artifact] is not None:
            return (f"Backend '{name}' ({backend.kind}) loads the adapter's `{artifact}`, which this swap does not "
                    f"give: it would go on serving the old file. Give the new version's `{artifact}` too.")
    return None


@router.delete("/adapters/{name}", status_code=204)
async def remove_adapter(name: str, state: StateDep) -> Response:
    users: list[str] = []

    def in_use(routes: list) -> None:
        users.extend(route.name for route in routes
                     if route.experiment and (name in route.experiment.variants or name in route.experiment.shadow))

    async def remove() -> None:
        # Claimed from the check on: no experiment may take it as a variant while it goes.
        async with state.experiments.claiming(name, in_use):
            await state.lifecycle.remove(name, referenced_by=users)
    try:
        await asyncio.shield(remove())
    except LIFECYCLE_ERRORS as exc:
        raise to_gateway_error(exc) from exc
    return Response(status_code=204)


def backend_view(state: GatewayState, name: str) -> dict:
    driver, placement = state.drivers[name], state.lifecycle.placements[name]
    up, busy, traffic = driver.replica_up(), driver.in_flight(), driver.replica_traffic()
    replicas = [{"url": url, "up": up[i], "in_flight": busy[i], "adapters": sorted(placement.ready[i]), **traffic[i]}
                for i, url in enumerate(driver.replicas)]
    return {"name": name, "kind": driver.kind, "up": state.healthy.get(name, False), "in_flight": sum(busy),
            "replicas": replicas}


@router.get("/backends")
async def list_backends(state: StateDep) -> dict:
    return {"data": [backend_view(state, backend.name) for backend in state.config.backends]}

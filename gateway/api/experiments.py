"""Experiments over HTTP: routes changed at run time (`PUT/DELETE /admin/routes/{name}`), an experiment's report
(`GET /admin/experiments/{name}`) and promotion (`POST /admin/experiments/{name}/promote`), all with an admin
key; and `POST /v1/feedback`, with the client key that made the request or an admin key."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.api.admin import LIFECYCLE_ERRORS, require_admin, swap_problem
from gateway.auth import Principal, authenticate, bearer, match_key
from gateway.config import GatewayConfig, RouteConfig
from gateway.control_body import strict_body
from gateway.dependencies import StateDep
from gateway.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableEntityError,
    quoted,
    to_gateway_error,
)
from gateway.experiments.service import DROP, ExperimentError, RouteGraph, UnknownExperimentError
from gateway.experiments.store import Feedback
from gateway.metrics import ExperimentRecorder
from gateway.state import GatewayState

MAX_METADATA_BYTES = 4096

admin_router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
feedback_router = APIRouter()


def check_route(route: RouteConfig, graph: RouteGraph, config: GatewayConfig) -> None:
    """What the config checks across keys, against the routes and adapters as they are now; ValueError names
    the key. Pure: it runs inside the store's transaction (Experiments.change_route)."""
    backends = {b.name for b in config.backends}
    if route.name in graph.adapters or route.name in graph.claimed:
        raise ValueError(f"name: '{route.name}' is an adapter's own route; an adapter changes by swap")
    if route.profile and route.profile not in config.sampling.profiles:
        raise ValueError(f"profile: {quoted(route.profile)} is not a sampling profile")
    for j, name in enumerate(route.targets or ()):
        if name not in backends:
            raise ValueError(f"targets[{j}]: {name!r} is not a backend ({sorted(backends)})")
    base_routes = {r.name for r in graph.routes if r.targets and r.name != route.name}
    for key in ("variants", "shadow"):
        for name in getattr(route.experiment, key) if route.experiment else {}:
            if name == route.name:
                raise ValueError(f"experiment.{key}: {name!r} is this experiment itself")
            if name in graph.claimed:
                raise ValueError(f"experiment.{key}: {name!r} is an adapter being added or removed; retry once "
                                 "that is done")
            if name not in graph.adapters and name not in base_routes:
                raise ValueError(f"experiment.{key}: {name!r} is not an adapter or a base route")


def experiments_using(name: str, routes: Iterable[RouteConfig]) -> list[str]:
    """The experiment routes among `routes` that send traffic (or shadow traffic) to the route or adapter `name`."""
    return [r.name for r in routes
            if r.experiment and r.name != name and (name in r.experiment.variants or name in r.experiment.shadow)]


def check_still_served(name: str, after: RouteConfig | None, routes: Iterable[RouteConfig]) -> None:
    """A base route that experiments pick must stay a base route: 409 before the store changes."""
    if after is not None and after.targets:
        return
    if users := experiments_using(name, routes):
        what = "removing it" if after is None else "making it an experiment"
        raise ConflictError(f"Route '{name}' is a variant of experiment(s) {users}; change them before {what}.",
                            param="name")


@admin_router.put("/routes/{name}", dependencies=[strict_body(RouteConfig)])
async def put_route(name: str, route: RouteConfig, state: StateDep) -> dict:
    if route.name != name:
        raise InvalidRequestError(f"The body's name '{route.name}' is not the path's {quoted(name)}.", param="name")

    def decide(graph: RouteGraph) -> RouteConfig:
        try:
            check_route(route, graph, state.config)
        except ValueError as exc:
            raise UnprocessableEntityError(f"Invalid route: {exc}", param=str(exc).split(":", 1)[0]) from exc
        check_still_served(name, route, graph.routes)
        return route

    await asyncio.shield(state.experiments.change_route(name, decide))
    return route_view(state, name)


@admin_router.delete("/routes/{name}", status_code=204)
async def delete_route(name: str, state: StateDep) -> Response:
    """Drop the run-time version of a route: the config file's (if any) is in force again."""
    in_config = next((r for r in state.config.routes if r.name == name), None)

    def decide(graph: RouteGraph) -> object:
        if name not in graph.overridden:
            raise NotFoundError(f"Route {quoted(name)} was not changed at run time.")
        check_still_served(name, in_config, graph.routes)
        return DROP

    await asyncio.shield(state.experiments.change_route(name, decide))
    return Response(status_code=204)


@admin_router.get("/routes/{name}")
async def get_route(name: str, state: StateDep) -> dict:
    if state.experiments.route(name) is None:
        raise NotFoundError(f"No route named {quoted(name)}.")
    return route_view(state, name)


def route_view(state: GatewayState, name: str) -> dict:
    route = state.experiments.route(name)
    override = state.experiments.overrides.get(name)
    return {**route.model_dump(mode="json"), "changed_at": override.updated_at if override else None}


@admin_router.get("/experiments/{name}")
async def experiment_report(name: str, state: StateDep) -> dict:
    try:
        return await state.experiments.report(name)
    except UnknownExperimentError as exc:
        raise NotFoundError(str(exc)) from exc


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str | None = None    # default: the report's winner (409 while there is none)


@admin_router.post("/experiments/{name}/promote", dependencies=[strict_body(PromoteBody)])
async def promote(name: str, state: StateDep, body: PromoteBody | None = None) -> dict:
    lifecycle = state.lifecycle

    def files(variant: str) -> dict:
        if variant not in lifecycle.names():
            raise ExperimentError(f"'{variant}' is a base route, not an adapter: there are no files to promote.")
        return lifecycle.view(variant)

    async def swap(control: str, source: str | None, gguf: str | None) -> None:
        if control not in lifecycle.names():
            raise ExperimentError(f"The control '{control}' is a base route: promote needs an adapter control.")
        if problem := swap_problem(lifecycle.view(control), source, gguf, state):
            raise ExperimentError(f"The control '{control}' cannot take the winner's files: {problem}")
        await lifecycle.swap(control, source, gguf)

    try:
        return await asyncio.shield(state.experiments.promote(name, body.variant if body else None, swap, files))
    except UnknownExperimentError as exc:
        raise NotFoundError(str(exc)) from exc
    except ExperimentError as exc:
        raise ConflictError(str(exc)) from exc
    except LIFECYCLE_ERRORS as exc:
        raise to_gateway_error(exc) from exc


class FeedbackBody(BaseModel):
    """Strict: a score is a JSON number and a label a JSON boolean ("0.5", "yes" and 1 are refused, not read)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str = Field(min_length=1, max_length=128)
    score: float | None = Field(None, ge=0, le=1)
    label: bool | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _small(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        if metadata is None:
            return None
        try:
            size = len(orjson.dumps(metadata))
        except orjson.JSONEncodeError:   # an integer past 64 bits: the gateway's JSON (orjson) cannot carry it
            raise ValueError("holds an integer outside the 64-bit range") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"over {MAX_METADATA_BYTES} bytes as JSON")
        return metadata

    @model_validator(mode="after")
    def _score_or_label(self) -> FeedbackBody:
        if (self.score is None) == (self.label is None):
            raise ValueError("give exactly one of `score` (0 to 1) or `label` (true or false)")
        return self


def is_admin(request: Request, state: GatewayState) -> bool:
    header = request.headers.get("authorization")
    presented = bearer(header.encode("latin-1") if header else None)
    return presented is not None and bool(state.admin_digests) and match_key(presented, state.admin_digests) >= 0


def feedback_caller(request: Request, state: GatewayState) -> Principal | None:
    """Who gives feedback: a client key's principal, or None for an admin key; 401 for neither."""
    if is_admin(request, state):
        return None
    header = request.headers.get("authorization")
    return authenticate(header.encode("latin-1") if header else None, state.client_keys)


@feedback_router.post("/v1/feedback", status_code=201)
async def feedback(body: FeedbackBody, request: Request, state: StateDep) -> dict:
    principal = feedback_caller(request, state)
    admin = principal is None
    store = state.experiments.store
    fact = await store.fact(body.request_id)
    if fact is None:
        await state.experiments.facts.flush()   # an answer from a moment ago may still be in the write queue
        fact = await store.fact(body.request_id)
    if fact is None:
        raise NotFoundError(f"No request with id '{body.request_id}' was served here (or it is past retention).",
                            param="request_id")
    if not admin and fact.key != principal.name:
        raise PermissionDeniedError("That request was made with another API key.", param="request_id")
    kind = "score" if body.score is not None else "label"
    value = body.score if body.score is not None else float(body.label)
    if not await store.add_feedback(Feedback(body.request_id, kind, value, time.time(), body.metadata)):
        raise ConflictError(f"Request '{body.request_id}' has {kind} feedback already.", param=kind)
    ExperimentRecorder(state.metrics).feedback(fact.experiment or "", fact.variant or "", kind)
    return {"request_id": body.request_id, "kind": kind, "value": value, "experiment": fact.experiment,
            "variant": fact.variant}

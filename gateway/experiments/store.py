"""ExperimentStore: what experiments keep durably, as one small async protocol (and its records).

Four kinds of data, all keyed by names from the config or by request id:
- route changes made at run time (`PUT /admin/routes/{name}`, the guard's rollbacks, promotions): the route
  as in config, as JSON, with when it was set; they win over the config file until deleted; each is checked
  against the routes as stored and written in one exclusive transaction (`change_route`);
- request facts: one per request the gateway served, written in batches off the hot path;
- feedback: at most one per (request id, kind), kind being "score" or "label";
- shadow calls and experiment events (guard rollbacks, promotions, weight changes), for the report.

Every method may do I/O and is async; none may block the event loop. `add_facts` takes whole batches and
must be one transaction. An implementation is free to answer `experiment_facts` from any index it likes; it
must return rows in time order. Timestamps are Unix seconds (float). The SQLite implementation is
`sqlite_store.SqliteExperimentStore`; the PostgreSQL one (`postgres_store.PostgresExperimentStore`) is
shared by replicas and announces route changes to `watch()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence


class RequestFact(NamedTuple):
    """A tuple in column order (one per request the gateway serves): the writer passes it to the store as its
    row, with no per-field copy (sql.row)."""

    request_id: str
    at: float                    # when the request finished
    route: str                   # the model the client named (an experiment's name, or any route)
    experiment: str | None       # the experiment, when the route is one
    variant: str | None
    adapter: str | None          # the version that answered: `name@hash8`
    backend: str | None
    key: str                     # the client key's config name ("" on an open gateway): who may give feedback
    status: int
    latency_s: float
    ttft_s: float | None         # first streamed event; a non-stream answer's first byte is the whole answer
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class Feedback:
    request_id: str
    kind: str                    # "score" or "label"
    value: float                 # a score in [0, 1], a label as 1.0 / 0.0
    at: float
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ShadowCall:
    request_id: str
    at: float
    experiment: str
    variant: str                 # the shadow candidate
    adapter: str | None
    backend: str | None
    status: int                  # 0: no answer (timeout, connection)
    latency_s: float
    completion_tokens: int | None
    output_sha256: str | None
    output_chars: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ExperimentEvent:
    experiment: str
    at: float
    kind: str                    # "rollback" | "promote" | "route"
    variant: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class RouteOverride:
    name: str
    route: dict[str, Any]        # the route as in config (RouteConfig's fields)
    updated_at: float


@dataclass(frozen=True, slots=True)
class RouteChange:
    """What `change_route` writes: the run-time version of route `name`, or (override None) its removal."""
    name: str
    override: RouteOverride | None


def after(stored: Sequence[RouteOverride], change: RouteChange) -> list[RouteOverride]:
    """The run-time routes once `change` is written (by name, as the stores list them)."""
    kept = [o for o in stored if o.name != change.name]
    return sorted([*kept, change.override] if change.override is not None else kept, key=lambda o: o.name)


@dataclass(frozen=True, slots=True)
class FactRow:
    """One experiment request with its feedback, for reports and the guard."""
    at: float
    variant: str
    status: int
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    score: float | None
    label: float | None


class ExperimentStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    # call `on_change()` when another replica may have changed run-time routes (a shared store); may do nothing
    async def watch(self, on_change: Callable[[], None]) -> None: ...

    # run-time routes
    async def route_overrides(self) -> list[RouteOverride]: ...
    async def put_route(self, override: RouteOverride) -> None: ...
    async def delete_route(self, name: str) -> bool: ...                 # False: there was none
    # A checked change, as one: `decide(the run-time routes as stored now)` returns the change to write (None:
    # none), or raises, and then nothing is written. No other change_route, of any replica or worker process,
    # runs between the read and the write. Returns the run-time routes after it, and the change made.
    async def change_route(self, decide: Callable[[list[RouteOverride]], RouteChange | None]
                           ) -> tuple[list[RouteOverride], RouteChange | None]: ...

    # request facts and shadow calls (batches from the background writer; one transaction each)
    async def add_facts(self, facts: Sequence[RequestFact], shadows: Sequence[ShadowCall]) -> None: ...
    async def fact(self, request_id: str) -> RequestFact | None: ...

    # feedback
    async def add_feedback(self, feedback: Feedback) -> bool: ...        # False: this kind exists already

    # reading an experiment (rows at or after `since`, time order)
    async def experiment_facts(self, experiment: str, since: float = 0.0) -> list[FactRow]: ...
    async def shadow_calls(self, experiment: str, since: float = 0.0) -> list[ShadowCall]: ...
    async def add_event(self, event: ExperimentEvent) -> None: ...
    async def events(self, experiment: str) -> list[ExperimentEvent]: ...

    # retention: facts, their feedback and shadow calls older than `before` go
    async def purge(self, before: float) -> int: ...

"""PostgresExperimentStore: the ExperimentStore shared by every gateway replica (config `store: {kind: postgres}`,
the same database as the adapter store).

Same semantics as SqliteExperimentStore: a batch of facts and shadow calls is one transaction (executemany);
the first fact of a request id wins; feedback is one per (request id, kind). Its schema has its own migration
numbering (table `experiment_schema_migration`) run by adapters/store_postgres.migrate under the same advisory
lock, so replicas starting together create it once. A route change sends a NOTIFY on `CHANNEL` in its own
transaction; `watch()` LISTENs and calls back for every one, and once more after a lost connection comes back
(notifications may have been missed then). Every failure to reach the database is StoreUnavailableError (503).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable, Sequence

from adapters.store_postgres import PostgresPool, listen
from gateway.experiments.sql import (
    INSERT_EVENT,
    INSERT_FACT,
    INSERT_SHADOW,
    PURGE,
    SELECT_EVENTS,
    SELECT_EXPERIMENT,
    SELECT_FACT,
    SELECT_ROUTES,
    SELECT_SHADOWS,
    row,
)
from gateway.experiments.store import (
    ExperimentEvent,
    FactRow,
    Feedback,
    RequestFact,
    RouteChange,
    RouteOverride,
    ShadowCall,
    after,
)

log = logging.getLogger(__name__)
CHANNEL = "kimi_gateway_routes"
ROUTES_LOCK = 0x6B696D69_67770002   # pg_advisory_xact_lock key of checked route changes: "kimi" + "gw" + 2, fixed
MIGRATION_TABLE = "experiment_schema_migration"

# (version, statements): append only; a released migration never changes.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
        CREATE TABLE route_override (
            name       TEXT PRIMARY KEY,
            route      TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE request_fact (
            request_id        TEXT PRIMARY KEY,
            at                DOUBLE PRECISION NOT NULL,
            route             TEXT NOT NULL,
            experiment        TEXT,
            variant           TEXT,
            adapter           TEXT,
            backend           TEXT,
            key               TEXT NOT NULL,
            status            INTEGER NOT NULL,
            latency_s         DOUBLE PRECISION NOT NULL,
            ttft_s            DOUBLE PRECISION,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER
        );
        CREATE INDEX request_fact_experiment ON request_fact (experiment, at) WHERE experiment IS NOT NULL;
        CREATE INDEX request_fact_at ON request_fact (at);
        CREATE TABLE feedback (
            request_id TEXT NOT NULL,
            kind       TEXT NOT NULL,
            value      DOUBLE PRECISION NOT NULL,
            at         DOUBLE PRECISION NOT NULL,
            metadata   TEXT,
            PRIMARY KEY (request_id, kind)
        );
        CREATE TABLE shadow_call (
            request_id        TEXT NOT NULL,
            at                DOUBLE PRECISION NOT NULL,
            experiment        TEXT NOT NULL,
            variant           TEXT NOT NULL,
            adapter           TEXT,
            backend           TEXT,
            status            INTEGER NOT NULL,
            latency_s         DOUBLE PRECISION NOT NULL,
            completion_tokens INTEGER,
            output_sha256     TEXT,
            output_chars      INTEGER,
            error             TEXT
        );
        CREATE INDEX shadow_call_experiment ON shadow_call (experiment, at);
        CREATE INDEX shadow_call_at ON shadow_call (at);
        CREATE TABLE experiment_event (
            experiment TEXT NOT NULL,
            at         DOUBLE PRECISION NOT NULL,
            kind       TEXT NOT NULL,
            variant    TEXT,
            detail     TEXT NOT NULL
        );
        CREATE INDEX experiment_event_experiment ON experiment_event (experiment, at);
    """),
)

class PostgresExperimentStore(PostgresPool):
    channel = CHANNEL
    migrations = MIGRATIONS
    migration_table = MIGRATION_TABLE
    what = "experiment store"

    # --- change notification ----------------------------------------------------------------------------

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Call `on_change()` for every committed route change (this replica's too), and once more every time
        the LISTEN connection comes back after a loss."""
        self._watch_task = asyncio.create_task(listen(self.dsn, CHANNEL, on_change, "experiment store"),
                                               name="experiment-store-listen")

    # --- run-time routes --------------------------------------------------------------------------------

    async def route_overrides(self) -> list[RouteOverride]:
        async with self._transaction() as conn:
            rows = await conn.fetch(SELECT_ROUTES)
        return [RouteOverride(r["name"], json.loads(r["route"]), r["updated_at"]) for r in rows]

    async def put_route(self, override: RouteOverride) -> None:
        async with self._transaction(notify=f"put {override.name}") as conn:
            await conn.execute(
                "INSERT INTO route_override (name, route, updated_at) VALUES ($1, $2, $3) ON CONFLICT (name) "
                "DO UPDATE SET route = EXCLUDED.route, updated_at = EXCLUDED.updated_at",
                override.name, json.dumps(override.route), override.updated_at)

    async def delete_route(self, name: str) -> bool:
        async with self._transaction(notify=f"delete {name}") as conn:
            return await conn.fetchval("DELETE FROM route_override WHERE name = $1 RETURNING name", name) is not None

    async def change_route(self, decide: Callable[[list[RouteOverride]], RouteChange | None]
                           ) -> tuple[list[RouteOverride], RouteChange | None]:
        """The advisory lock, held to the commit, makes every replica's checked changes take turns; the read
        comes after it, so `decide` sees the change the previous holder committed."""
        async with self._transaction(notify="change") as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ROUTES_LOCK)
            stored = [RouteOverride(r["name"], json.loads(r["route"]), r["updated_at"])
                      for r in await conn.fetch(SELECT_ROUTES)]
            change = decide(stored)
            if change is None:
                return stored, None
            if change.override is None:
                await conn.execute("DELETE FROM route_override WHERE name = $1", change.name)
            else:
                await conn.execute(
                    "INSERT INTO route_override (name, route, updated_at) VALUES ($1, $2, $3) ON CONFLICT (name) "
                    "DO UPDATE SET route = EXCLUDED.route, updated_at = EXCLUDED.updated_at",
                    change.name, json.dumps(change.override.route), change.override.updated_at)
            return after(stored, change), change

    # --- facts, shadow calls, feedback --------------------------------------------------------------------

    async def add_facts(self, facts: Sequence[RequestFact], shadows: Sequence[ShadowCall]) -> None:
        fact_rows, shadow_rows = facts, [row(s) for s in shadows]   # a RequestFact is its row
        async with self._transaction() as conn:
            if fact_rows:
                await conn.executemany(INSERT_FACT, fact_rows)
            if shadow_rows:
                await conn.executemany(INSERT_SHADOW, shadow_rows)

    async def fact(self, request_id: str) -> RequestFact | None:
        async with self._transaction() as conn:
            row = await conn.fetchrow(SELECT_FACT, request_id)
        return RequestFact(*row) if row else None

    async def add_feedback(self, feedback: Feedback) -> bool:
        metadata = json.dumps(feedback.metadata) if feedback.metadata is not None else None
        async with self._transaction() as conn:
            added = await conn.fetchval(
                "INSERT INTO feedback (request_id, kind, value, at, metadata) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (request_id, kind) DO NOTHING RETURNING request_id",
                feedback.request_id, feedback.kind, feedback.value, feedback.at, metadata)
        return added is not None

    # --- reading an experiment ------------------------------------------------------------------------------

    async def experiment_facts(self, experiment: str, since: float = 0.0) -> list[FactRow]:
        async with self._transaction() as conn:
            rows = await conn.fetch(SELECT_EXPERIMENT, experiment, since)
        return [FactRow(*row) for row in rows]

    async def shadow_calls(self, experiment: str, since: float = 0.0) -> list[ShadowCall]:
        async with self._transaction() as conn:
            rows = await conn.fetch(SELECT_SHADOWS, experiment, since)
        return [ShadowCall(*row) for row in rows]

    async def add_event(self, event: ExperimentEvent) -> None:
        async with self._transaction() as conn:
            await conn.execute(INSERT_EVENT, event.experiment, event.at, event.kind, event.variant, event.detail)

    async def events(self, experiment: str) -> list[ExperimentEvent]:
        async with self._transaction() as conn:
            rows = await conn.fetch(SELECT_EVENTS, experiment)
        return [ExperimentEvent(*row) for row in rows]

    async def purge(self, before: float) -> int:
        async with self._transaction() as conn:
            return sum([int((await conn.execute(statement, before)).rsplit(" ", 1)[1]) for statement in PURGE])

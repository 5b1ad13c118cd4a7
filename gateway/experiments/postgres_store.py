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
from contextlib import asynccontextmanager
from typing import Callable, Sequence

import asyncpg

from adapters.store import StoreUnavailableError
from adapters.store_postgres import CONNECT_TIMEOUT_S, COMMAND_TIMEOUT_S, OPEN_WAIT_S, UNREACHABLE
from adapters.store_postgres import connect_at_start, describe, listen, migrate
from gateway.experiments.store import ExperimentEvent, FactRow, Feedback, RequestFact, RouteOverride, ShadowCall

log = logging.getLogger(__name__)
CHANNEL = "kimi_gateway_routes"
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

INSERT_FACT = ("INSERT INTO request_fact (request_id, at, route, experiment, variant, adapter, backend, key, status, "
               "latency_s, ttft_s, prompt_tokens, completion_tokens) "
               "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) ON CONFLICT (request_id) DO NOTHING")
INSERT_SHADOW = ("INSERT INTO shadow_call (request_id, at, experiment, variant, adapter, backend, status, latency_s, "
                 "completion_tokens, output_sha256, output_chars, error) "
                 "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)")
SELECT_FACT = ("SELECT request_id, at, route, experiment, variant, adapter, backend, key, status, latency_s, ttft_s, "
               "prompt_tokens, completion_tokens FROM request_fact WHERE request_id = $1")
SELECT_EXPERIMENT = """
SELECT f.at, f.variant, f.status, f.latency_s, f.ttft_s, f.prompt_tokens, f.completion_tokens, s.value, l.value
FROM request_fact f
LEFT JOIN feedback s ON s.request_id = f.request_id AND s.kind = 'score'
LEFT JOIN feedback l ON l.request_id = f.request_id AND l.kind = 'label'
WHERE f.experiment = $1 AND f.at >= $2
ORDER BY f.at
"""
SELECT_SHADOWS = ("SELECT request_id, at, experiment, variant, adapter, backend, status, latency_s, completion_tokens, "
                  "output_sha256, output_chars, error FROM shadow_call WHERE experiment = $1 AND at >= $2 ORDER BY at")
PURGE = (
    "DELETE FROM feedback WHERE request_id IN (SELECT request_id FROM request_fact WHERE at < $1)",
    "DELETE FROM request_fact WHERE at < $1",
    "DELETE FROM shadow_call WHERE at < $1",
)


class PostgresExperimentStore:
    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._watch_task: asyncio.Task | None = None

    async def open(self, wait_s: float = OPEN_WAIT_S) -> None:
        """Migrate, then open the pool; a database that is away at start is waited for `wait_s`."""
        conn = await connect_at_start(self.dsn, wait_s, "experiment store")
        try:
            applied = await migrate(conn, MIGRATIONS, MIGRATION_TABLE)
        finally:
            await conn.close()
        if applied:
            log.info("experiment store: applied migrations %s", applied)
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size,
                                               timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S)

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        if self._pool is not None:
            self._pool.terminate()   # not close(): a pool whose server is gone would wait for it
            self._pool = None

    @asynccontextmanager
    async def _transaction(self, notify: str | None = None):
        """One transaction on a pooled connection; `notify` is announced on CHANNEL when it commits."""
        assert self._pool is not None, "the store is not open"
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                async with conn.transaction():
                    yield conn
                    if notify is not None:
                        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, notify)
        except UNREACHABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc

    # --- change notification ----------------------------------------------------------------------------

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Call `on_change()` for every committed route change (this replica's too), and once more every time
        the LISTEN connection comes back after a loss."""
        self._watch_task = asyncio.create_task(listen(self.dsn, CHANNEL, on_change, "experiment store"),
                                               name="experiment-store-listen")

    # --- run-time routes --------------------------------------------------------------------------------

    async def route_overrides(self) -> list[RouteOverride]:
        async with self._transaction() as conn:
            rows = await conn.fetch("SELECT name, route, updated_at FROM route_override ORDER BY name")
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

    # --- facts, shadow calls, feedback --------------------------------------------------------------------

    async def add_facts(self, facts: Sequence[RequestFact], shadows: Sequence[ShadowCall]) -> None:
        fact_rows = [(f.request_id, f.at, f.route, f.experiment, f.variant, f.adapter, f.backend, f.key, f.status,
                      f.latency_s, f.ttft_s, f.prompt_tokens, f.completion_tokens) for f in facts]
        shadow_rows = [(s.request_id, s.at, s.experiment, s.variant, s.adapter, s.backend, s.status, s.latency_s,
                        s.completion_tokens, s.output_sha256, s.output_chars, s.error) for s in shadows]
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
            await conn.execute("INSERT INTO experiment_event (experiment, at, kind, variant, detail) "
                               "VALUES ($1, $2, $3, $4, $5)",
                               event.experiment, event.at, event.kind, event.variant, event.detail)

    async def events(self, experiment: str) -> list[ExperimentEvent]:
        async with self._transaction() as conn:
            rows = await conn.fetch("SELECT experiment, at, kind, variant, detail FROM experiment_event "
                                    "WHERE experiment = $1 ORDER BY at", experiment)
        return [ExperimentEvent(*row) for row in rows]

    async def purge(self, before: float) -> int:
        async with self._transaction() as conn:
            return sum([int((await conn.execute(statement, before)).rsplit(" ", 1)[1]) for statement in PURGE])

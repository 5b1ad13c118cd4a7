"""SqliteExperimentStore: the embedded ExperimentStore, `experiments.sqlite3` under state_dir.

Its schema is here; the statements it shares with PostgresExperimentStore are in gateway/experiments/sql.py.
One connection on one worker thread (as adapters/store.py):
writes are serialised without locks the event loop could wait on; WAL, so reports read while facts are
written; synchronous=NORMAL: in WAL mode a commit survives a process crash (kill -9), and facts are
statistics, not the registry, so a power cut may lose the last batch.
"""
from __future__ import annotations

import json
import sqlite3
from typing import Callable, Sequence

from adapters.store import SqliteFile
from gateway.experiments import sql
from gateway.experiments.sql import for_sqlite, row
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS route_override (
    name       TEXT PRIMARY KEY,
    route      TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS request_fact (
    request_id        TEXT PRIMARY KEY,
    at                REAL NOT NULL,
    route             TEXT NOT NULL,
    experiment        TEXT,
    variant           TEXT,
    adapter           TEXT,
    backend           TEXT,
    key               TEXT NOT NULL,
    status            INTEGER NOT NULL,
    latency_s         REAL NOT NULL,
    ttft_s            REAL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER
);
CREATE INDEX IF NOT EXISTS request_fact_experiment ON request_fact (experiment, at) WHERE experiment IS NOT NULL;
CREATE INDEX IF NOT EXISTS request_fact_at ON request_fact (at);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    value      REAL NOT NULL,
    at         REAL NOT NULL,
    metadata   TEXT,
    PRIMARY KEY (request_id, kind)
);
CREATE TABLE IF NOT EXISTS shadow_call (
    request_id        TEXT NOT NULL,
    at                REAL NOT NULL,
    experiment        TEXT NOT NULL,
    variant           TEXT NOT NULL,
    adapter           TEXT,
    backend           TEXT,
    status            INTEGER NOT NULL,
    latency_s         REAL NOT NULL,
    completion_tokens INTEGER,
    output_sha256     TEXT,
    output_chars      INTEGER,
    error             TEXT
);
CREATE INDEX IF NOT EXISTS shadow_call_experiment ON shadow_call (experiment, at);
CREATE TABLE IF NOT EXISTS experiment_event (
    experiment TEXT NOT NULL,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    variant    TEXT,
    detail     TEXT NOT NULL
);
"""
INSERT_FACT, INSERT_SHADOW, SELECT_FACT, SELECT_EXPERIMENT, SELECT_SHADOWS, INSERT_EVENT, SELECT_EVENTS, \
    SELECT_ROUTES = (for_sqlite(statement) for statement in (
        sql.INSERT_FACT, sql.INSERT_SHADOW, sql.SELECT_FACT, sql.SELECT_EXPERIMENT, sql.SELECT_SHADOWS,
        sql.INSERT_EVENT, sql.SELECT_EVENTS, sql.SELECT_ROUTES))
PURGE = tuple(for_sqlite(statement) for statement in sql.PURGE)


class SqliteExperimentStore(SqliteFile):
    filename = "experiments.sqlite3"
    schema = SCHEMA
    synchronous = "NORMAL"    # WAL: a commit survives kill -9; facts are statistics, a power cut may lose a batch
    thread_name = "experiment-store"

    async def watch(self, on_change: Callable[[], None]) -> None:
        """One replica's own file: nobody else changes it."""

    async def route_overrides(self) -> list[RouteOverride]:
        rows = await self._run(lambda db: db.execute(SELECT_ROUTES).fetchall(), write=False)
        return [RouteOverride(name, json.loads(route), updated) for name, route, updated in rows]

    async def put_route(self, override: RouteOverride) -> None:
        await self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO route_override (name, route, updated_at) VALUES (?, ?, ?)",
            (override.name, json.dumps(override.route), override.updated_at)))

    async def delete_route(self, name: str) -> bool:
        return await self._run(lambda db: db.execute(
            "DELETE FROM route_override WHERE name = ?", (name,)).rowcount > 0)

    async def change_route(self, decide: Callable[[list[RouteOverride]], RouteChange | None]
                           ) -> tuple[list[RouteOverride], RouteChange | None]:
        """BEGIN IMMEDIATE takes the file's write lock before the read: another worker process's change waits for
        this one's commit (`decide` runs on the store's thread, so it must only read what it is given)."""
        def work(db: sqlite3.Connection) -> tuple[list[RouteOverride], RouteChange | None]:
            db.execute("BEGIN IMMEDIATE")
            stored = [RouteOverride(name, json.loads(route), updated)
                      for name, route, updated in db.execute(SELECT_ROUTES).fetchall()]
            change = decide(stored)
            if change is None:
                return stored, None
            if change.override is None:
                db.execute("DELETE FROM route_override WHERE name = ?", (change.name,))
            else:
                db.execute("INSERT OR REPLACE INTO route_override (name, route, updated_at) VALUES (?, ?, ?)",
                           (change.name, json.dumps(change.override.route), change.override.updated_at))
            return after(stored, change), change
        return await self._run(work)

    async def add_facts(self, facts: Sequence[RequestFact], shadows: Sequence[ShadowCall]) -> None:
        # A RequestFact is its row; as a plain tuple, because sqlite3 binds a tuple subclass's items one
        # `__getitem__` call each (~700 instructions per parameter) and an exact tuple's directly.
        fact_rows, shadow_rows = [tuple(fact) for fact in facts], [row(s) for s in shadows]

        def work(db: sqlite3.Connection) -> None:
            db.executemany(INSERT_FACT, fact_rows)
            db.executemany(INSERT_SHADOW, shadow_rows)
        await self._run(work)

    async def fact(self, request_id: str) -> RequestFact | None:
        row = await self._run(lambda db: db.execute(SELECT_FACT, (request_id,)).fetchone())
        return RequestFact(*row) if row else None

    async def add_feedback(self, feedback: Feedback) -> bool:
        metadata = json.dumps(feedback.metadata) if feedback.metadata is not None else None
        return await self._run(lambda db: db.execute(
            "INSERT OR IGNORE INTO feedback (request_id, kind, value, at, metadata) VALUES (?, ?, ?, ?, ?)",
            (feedback.request_id, feedback.kind, feedback.value, feedback.at, metadata)).rowcount > 0)

    async def experiment_facts(self, experiment: str, since: float = 0.0) -> list[FactRow]:
        rows = await self._run(lambda db: db.execute(SELECT_EXPERIMENT, (experiment, since)).fetchall())
        return [FactRow(*row) for row in rows]

    async def shadow_calls(self, experiment: str, since: float = 0.0) -> list[ShadowCall]:
        rows = await self._run(lambda db: db.execute(SELECT_SHADOWS, (experiment, since)).fetchall())
        return [ShadowCall(*row) for row in rows]

    async def add_event(self, event: ExperimentEvent) -> None:
        await self._run(lambda db: db.execute(
            INSERT_EVENT, (event.experiment, event.at, event.kind, event.variant, event.detail)))

    async def events(self, experiment: str) -> list[ExperimentEvent]:
        rows = await self._run(lambda db: db.execute(SELECT_EVENTS, (experiment,)).fetchall())
        return [ExperimentEvent(*row) for row in rows]

    async def purge(self, before: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            return sum(db.execute(statement, (before,)).rowcount for statement in PURGE)
        return await self._run(work)

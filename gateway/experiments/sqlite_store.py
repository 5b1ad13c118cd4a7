"""SqliteExperimentStore: the embedded ExperimentStore, `experiments.sqlite3` under state_dir.

All SQL of experiments is in this module. One connection on one worker thread (as adapters/store.py):
writes are serialised without locks the event loop could wait on; WAL, so reports read while facts are
written; synchronous=NORMAL: in WAL mode a commit survives a process crash (kill -9), and facts are
statistics, not the registry, so a power cut may lose the last batch.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from gateway.experiments.store import ExperimentEvent, FactRow, Feedback, RequestFact, RouteOverride, ShadowCall

T = TypeVar("T")

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
INSERT_FACT = ("INSERT OR IGNORE INTO request_fact (request_id, at, route, experiment, variant, adapter, backend, key, "
               "status, latency_s, ttft_s, prompt_tokens, completion_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")
INSERT_SHADOW = ("INSERT INTO shadow_call (request_id, at, experiment, variant, adapter, backend, status, latency_s, "
                 "completion_tokens, output_sha256, output_chars, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
SELECT_FACT = ("SELECT request_id, at, route, experiment, variant, adapter, backend, key, status, latency_s, ttft_s, "
               "prompt_tokens, completion_tokens FROM request_fact WHERE request_id = ?")
SELECT_EXPERIMENT = """
SELECT f.at, f.variant, f.status, f.latency_s, f.ttft_s, f.prompt_tokens, f.completion_tokens, s.value, l.value
FROM request_fact f
LEFT JOIN feedback s ON s.request_id = f.request_id AND s.kind = 'score'
LEFT JOIN feedback l ON l.request_id = f.request_id AND l.kind = 'label'
WHERE f.experiment = ? AND f.at >= ?
ORDER BY f.at
"""
SELECT_SHADOWS = ("SELECT request_id, at, experiment, variant, adapter, backend, status, latency_s, completion_tokens, "
                  "output_sha256, output_chars, error FROM shadow_call WHERE experiment = ? AND at >= ? ORDER BY at")
PURGE = (
    "DELETE FROM feedback WHERE request_id IN (SELECT request_id FROM request_fact WHERE at < ?)",
    "DELETE FROM request_fact WHERE at < ?",
    "DELETE FROM shadow_call WHERE at < ?",
)


class SqliteExperimentStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "experiments.sqlite3"
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._in_transaction, work)

    def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._db:
            return work(self._db)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiment-store")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
            self._executor.shutdown(wait=True)
            self._executor = None

    async def watch(self, on_change: Callable[[], None]) -> None:
        """One replica's own file: nobody else changes it."""

    async def route_overrides(self) -> list[RouteOverride]:
        rows = await self._run(lambda db: db.execute(
            "SELECT name, route, updated_at FROM route_override ORDER BY name").fetchall())
        return [RouteOverride(name, json.loads(route), updated) for name, route, updated in rows]

    async def put_route(self, override: RouteOverride) -> None:
        await self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO route_override (name, route, updated_at) VALUES (?, ?, ?)",
            (override.name, json.dumps(override.route), override.updated_at)))

    async def delete_route(self, name: str) -> bool:
        return await self._run(lambda db: db.execute(
            "DELETE FROM route_override WHERE name = ?", (name,)).rowcount > 0)

    async def add_facts(self, facts: Sequence[RequestFact], shadows: Sequence[ShadowCall]) -> None:
        fact_rows = [(f.request_id, f.at, f.route, f.experiment, f.variant, f.adapter, f.backend, f.key, f.status,
                      f.latency_s, f.ttft_s, f.prompt_tokens, f.completion_tokens) for f in facts]
        shadow_rows = [(s.request_id, s.at, s.experiment, s.variant, s.adapter, s.backend, s.status, s.latency_s,
                        s.completion_tokens, s.output_sha256, s.output_chars, s.error) for s in shadows]

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
            "INSERT INTO experiment_event (experiment, at, kind, variant, detail) VALUES (?, ?, ?, ?, ?)",
            (event.experiment, event.at, event.kind, event.variant, event.detail)))

    async def events(self, experiment: str) -> list[ExperimentEvent]:
        rows = await self._run(lambda db: db.execute(
            "SELECT experiment, at, kind, variant, detail FROM experiment_event WHERE experiment = ? ORDER BY at",
            (experiment,)).fetchall())
        return [ExperimentEvent(*row) for row in rows]

    async def purge(self, before: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            return sum(db.execute(statement, (before,)).rowcount for statement in PURGE)
        return await self._run(work)

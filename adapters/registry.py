"""AdapterRegistry: the adapters the gateway knows, persisted in SQLite under state_dir so that adapters
registered at run time survive a restart. The config file seeds it: a config adapter is added once, and
an adapter removed through the admin API stays removed even though the file still names it.

The only mutable store of adapters; writers hold its asyncio.Lock, and SQLite work runs in a thread.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable

from adapters.models import AdapterRecord, AdapterSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    origin     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    removed    INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
)
"""


class AdapterExistsError(ValueError):
    pass


class AdapterNotFoundError(KeyError):
    pass


class AdapterRegistry:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "registry.sqlite3"
        self.lock = asyncio.Lock()
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")   # several gateway replicas may share a state_dir
        return db

    def seed(self, specs: Iterable[AdapterSpec]) -> None:
        """Add config adapters the registry has never seen (removed ones stay removed)."""
        now = time.time()
        with self._connect() as db:
            for spec in specs:
                db.execute("INSERT OR IGNORE INTO adapters (name, spec, origin, version, updated_at) "
                           "VALUES (?, ?, 'config', 1, ?)", (spec.name, spec.model_dump_json(), now))

    def records(self) -> list[AdapterRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT spec, origin, version, updated_at FROM adapters WHERE removed = 0 "
                              "ORDER BY rowid").fetchall()
        return [AdapterRecord(AdapterSpec.model_validate(json.loads(spec)), origin, version, updated)
                for spec, origin, version, updated in rows]

    def specs(self) -> list[AdapterSpec]:
        return [record.spec for record in self.records()]

    def add(self, spec: AdapterSpec) -> AdapterRecord:
        now = time.time()
        with self._connect() as db:
            row = db.execute("SELECT removed, version FROM adapters WHERE name = ?", (spec.name,)).fetchone()
            if row is not None and not row[0]:
                raise AdapterExistsError(f"adapter {spec.name!r} is already registered")
            version = (row[1] + 1) if row else 1
            db.execute("INSERT OR REPLACE INTO adapters (name, spec, origin, version, removed, updated_at) "
                       "VALUES (?, ?, 'admin', ?, 0, ?)", (spec.name, spec.model_dump_json(), version, now))
        return AdapterRecord(spec, "admin", version, now)

    def remove(self, name: str) -> None:
        with self._connect() as db:
            changed = db.execute("UPDATE adapters SET removed = 1, updated_at = ? WHERE name = ? AND removed = 0",
                                 (time.time(), name)).rowcount
        if not changed:
            raise AdapterNotFoundError(name)

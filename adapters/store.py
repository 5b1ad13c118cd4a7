"""The adapter store: the durable half of the registry (adapters, their versions, per-replica states).

`AdapterStore` is the interface the lifecycle uses, async all the way so that a networked store fits behind it:
`SqliteStore` is the embedded default under `state_dir` (one replica), `PostgresStore` (adapters/store_postgres.py)
the one every replica of a fleet shares. Nothing outside these modules knows SQL: no locks held by callers.

Durability: every write is one SQLite transaction in WAL mode with synchronous=FULL, so a `kill -9` at any
moment leaves the last committed state. The route flip of a swap is one UPDATE (`activate`): after a crash
the adapter serves either the old version or the new one, never neither. Versions and replica states that
were in flight are recorded as such and settled by the lifecycle at the next start.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Protocol, TypeVar

from adapters.models import AdapterRecord, AdapterSpec, AdapterVersion, ReplicaPhase, ReplicaState, VersionStatus

T = TypeVar("T")


class AdapterExistsError(ValueError):
    pass


class AdapterNotFoundError(KeyError):
    pass


class StoreUnavailableError(ConnectionError):
    """The store cannot be reached now (PostgreSQL down): the admin change is refused (503), serving goes on."""


class AdapterStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def seed(self, specs: Iterable[AdapterSpec]) -> list[str]: ...   # names added (removed ones stay removed)
    async def adapters(self) -> list[AdapterRecord]: ...
    async def add_adapter(self, spec: AdapterSpec, origin: str) -> AdapterRecord: ...
    async def remove_adapter(self, name: str) -> None: ...
    async def put_version(self, version: AdapterVersion) -> None: ...
    async def versions(self, name: str | None = None) -> list[AdapterVersion]: ...
    async def activate(self, version: AdapterVersion) -> AdapterRecord: ...  # the atomic route flip
    async def put_state(self, state: ReplicaState) -> None: ...
    async def states(self, name: str | None = None) -> list[ReplicaState]: ...
    async def snapshot(self) -> tuple[list[AdapterRecord], list[AdapterVersion], list[ReplicaState]]: ...
    async def watch(self, on_change: Callable[[], None]) -> None: ...   # other writers' changes, as they commit
    writes: int   # this process's writes, counted as each starts and as each ends: a snapshot read while it moved
    writing: int  # ... may be stale, and so may one read while any of them was in flight (begun, not committed)


SCHEMA = """
CREATE TABLE IF NOT EXISTS adapter (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    origin     TEXT NOT NULL,
    active     TEXT,
    removed    INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adapter_version (
    adapter       TEXT NOT NULL,
    version       TEXT NOT NULL,
    source        TEXT,
    gguf          TEXT,
    adapter_class TEXT NOT NULL,
    rank          INTEGER,
    status        TEXT NOT NULL,
    reason        TEXT,
    created_at    REAL NOT NULL,
    PRIMARY KEY (adapter, version)
);
CREATE TABLE IF NOT EXISTS replica_state (
    adapter    TEXT NOT NULL,
    version    TEXT NOT NULL,
    backend    TEXT NOT NULL,
    replica    TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (adapter, version, backend, replica)
);
"""


# What both stores (this one and adapters/store_postgres.py) read and write, in one column order; a row is a
# sqlite3 tuple or an asyncpg Record, both unpacked by position.
ADAPTER_COLUMNS = "spec, origin, active, updated_at"
VERSION_COLUMNS = "adapter, version, source, gguf, adapter_class, rank, status, reason, created_at"
STATE_COLUMNS = "adapter, version, backend, replica, state, reason, updated_at"


def adapter_record(row) -> AdapterRecord:
    spec, origin, active, updated_at = row
    return AdapterRecord(AdapterSpec.model_validate(json.loads(spec)), origin, active, updated_at)


def adapter_version(row) -> AdapterVersion:
    adapter, version, source, gguf, adapter_class, rank, status, reason, created_at = row
    return AdapterVersion(adapter, version, source, gguf, adapter_class, rank, VersionStatus(status), created_at,
                          reason)


def replica_state(row) -> ReplicaState:
    adapter, version, backend, replica, state, reason, updated_at = row
    return ReplicaState(adapter, version, backend, replica, ReplicaPhase(state), reason, updated_at)


def version_row(v: AdapterVersion) -> tuple:
    return v.adapter, v.version, v.source, v.gguf, v.adapter_class, v.rank, v.status.value, v.reason, v.created_at


def state_row(s: ReplicaState) -> tuple:
    return s.adapter, s.version, s.backend, s.replica, s.state.value, s.reason, s.updated_at


# A None parameter has no adapter registered, so the sqlite3 module looks for `__adapt__` on its protocol type and
# `__conform__` on None, each a failed attribute lookup with its exception, before binding NULL: about 2k
# instructions per None, and a request fact carries three or four (bench/README.md). An adapter found in the
# registry ends the search; `{}.get` is a C callable that returns None for None (NULL, as before).
sqlite3.register_adapter(type(None), {}.get)


class SqliteFile:
    """One SQLite file, one connection, used from one worker thread: SQLite work never blocks the event loop,
    and writes are serialised without any lock the caller could hold. WAL: readers never block the writer, and
    several processes may share the file. Subclasses name the file, the schema and `synchronous`."""

    filename = ""
    schema = ""
    synchronous = "FULL"          # a commit survives power loss, not just kill -9
    thread_name = "store"

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / self.filename
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self.writes = 0                  # local writes, at start and at end: a reader can tell its snapshot may be
        self.writing = 0                 # stale (AdapterStore.writes); and those in flight now

    async def _run(self, work: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        self.writes += write
        self.writing += write
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._in_transaction, work)
        finally:
            self.writes += write
            self.writing -= write

    def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._db:  # one transaction: committed whole or rolled back whole
            return work(self._db)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.executescript(self.schema)
        self._db = db
        self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        """What an older file needs beyond the schema's CREATE IF NOT EXISTS."""

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
            self._executor.shutdown(wait=True)
            self._executor = None


class SqliteStore(SqliteFile):
    """The adapter registry in `<state_dir>/registry.sqlite3`."""

    filename = "registry.sqlite3"
    schema = SCHEMA
    thread_name = "adapter-store"

    def _migrate(self, db: sqlite3.Connection) -> None:
        """The first registry kept specs in `adapters` (no versions): carry its live rows over once."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='adapters'").fetchone() is None:
            return
        with db:
            db.execute("INSERT OR IGNORE INTO adapter (name, spec, origin, removed, updated_at) "
                       "SELECT name, spec, origin, removed, updated_at FROM adapters")
            db.execute("DROP TABLE adapters")

    async def seed(self, specs: Iterable[AdapterSpec]) -> list[str]:
        specs, now = list(specs), time.time()

        def work(db: sqlite3.Connection) -> list[str]:
            added = []
            for spec in specs:
                cursor = db.execute("INSERT OR IGNORE INTO adapter (name, spec, origin, updated_at) "
                                    "VALUES (?, ?, 'config', ?)", (spec.name, spec.model_dump_json(), now))
                if cursor.rowcount:
                    added.append(spec.name)
            return added
        return await self._run(work)

    async def adapters(self) -> list[AdapterRecord]:
        rows = await self._run(lambda db: db.execute(
            f"SELECT {ADAPTER_COLUMNS} FROM adapter WHERE removed = 0 ORDER BY rowid").fetchall(), False)
        return [adapter_record(row) for row in rows]

    async def add_adapter(self, spec: AdapterSpec, origin: str) -> AdapterRecord:
        now = time.time()

        def work(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT removed FROM adapter WHERE name = ?", (spec.name,)).fetchone()
            if row is not None and not row[0]:
                raise AdapterExistsError(f"adapter {spec.name!r} is already registered")
            db.execute("INSERT OR REPLACE INTO adapter (name, spec, origin, active, removed, updated_at) "
                       "VALUES (?, ?, ?, NULL, 0, ?)", (spec.name, spec.model_dump_json(), origin, now))
        await self._run(work)
        return AdapterRecord(spec, origin, None, now)

    async def remove_adapter(self, name: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            changed = db.execute("UPDATE adapter SET removed = 1, updated_at = ? WHERE name = ? AND removed = 0",
                                 (time.time(), name)).rowcount
            if not changed:
                raise AdapterNotFoundError(name)
        await self._run(work)

    async def put_version(self, version: AdapterVersion) -> None:
        await self._run(lambda db: db.execute(
            f"INSERT OR REPLACE INTO adapter_version ({VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            version_row(version)))

    async def versions(self, name: str | None = None) -> list[AdapterVersion]:
        query = (f"SELECT {VERSION_COLUMNS} FROM adapter_version" + (" WHERE adapter = ?" if name else "")
                 + " ORDER BY created_at")
        rows = await self._run(lambda db: db.execute(query, (name,) if name else ()).fetchall(), False)
        return [adapter_version(row) for row in rows]

    async def activate(self, version: AdapterVersion) -> AdapterRecord:
        """One transaction: the adapter points at `version` (its spec takes the version's files), the version is
        active and the one it replaces is retiring."""
        now = time.time()

        def work(db: sqlite3.Connection) -> AdapterRecord:
            row = db.execute("SELECT spec, origin, active FROM adapter WHERE name = ? AND removed = 0",
                             (version.adapter,)).fetchone()
            if row is None:
                raise AdapterNotFoundError(version.adapter)
            spec = AdapterSpec.model_validate(json.loads(row[0]))
            spec = spec.model_copy(update={"source": version.source, "gguf": version.gguf})
            db.execute("UPDATE adapter SET spec = ?, active = ?, updated_at = ? WHERE name = ?",
                       (spec.model_dump_json(), version.version, now, version.adapter))
            if row[2] and row[2] != version.version:
                db.execute("UPDATE adapter_version SET status = ? WHERE adapter = ? AND version = ?",
                           (VersionStatus.RETIRING.value, version.adapter, row[2]))
            db.execute("UPDATE adapter_version SET status = ?, reason = NULL WHERE adapter = ? AND version = ?",
                       (VersionStatus.ACTIVE.value, version.adapter, version.version))
            return AdapterRecord(spec, row[1], version.version, now)
        return await self._run(work)

    async def put_state(self, state: ReplicaState) -> None:
        await self._run(lambda db: db.execute(
            f"INSERT OR REPLACE INTO replica_state ({STATE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", state_row(state)))

    async def states(self, name: str | None = None) -> list[ReplicaState]:
        query = (f"SELECT {STATE_COLUMNS} FROM replica_state" + (" WHERE adapter = ?" if name else "")
                 + " ORDER BY adapter, backend, replica")
        rows = await self._run(lambda db: db.execute(query, (name,) if name else ()).fetchall(), False)
        return [replica_state(row) for row in rows]


    async def snapshot(self) -> tuple[list[AdapterRecord], list[AdapterVersion], list[ReplicaState]]:
        return await self.adapters(), await self.versions(), await self.states()

    async def watch(self, on_change: Callable[[], None]) -> None:
        """One replica owns a SQLite store: no other writer to hear from."""


def open_store(state_dir: str, dsn: str | None = None, pool_size: int = 4) -> AdapterStore:
    """The configured store: PostgreSQL when a DSN is given (a fleet), else SQLite under state_dir."""
    if dsn is not None:
        from adapters.store_postgres import PostgresStore  # asyncpg is only imported where it is used
        return PostgresStore(dsn, pool_size=pool_size)
    return SqliteStore(Path(state_dir).expanduser())

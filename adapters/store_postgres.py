"""PostgresStore: the adapter store shared by every gateway replica (config `store: {kind: postgres}`).

Same semantics as SqliteStore (adapters/store.py): every write is one transaction, and `activate` flips the
route in one. Each write that changes what replicas serve also sends a NOTIFY on `CHANNEL` inside its own
transaction, so a replica hears of a change exactly when it is committed; `watch()` keeps a LISTEN connection
open and, after it lost one, says "re-read everything" (a missed notification never leaves a stale replica).

Migrations are numbered and run at open under an advisory lock: replicas that start together run each
one once. The pool's connections time out fast, and every failure to reach the database becomes
StoreUnavailableError (the admin API answers 503; serving never touches the store).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable, Iterable

import asyncpg

from adapters.models import AdapterRecord, AdapterSpec, AdapterVersion, ReplicaPhase, ReplicaState, VersionStatus
from adapters.store import (
    ADAPTER_COLUMNS,
    STATE_COLUMNS,
    VERSION_COLUMNS,
    AdapterExistsError,
    AdapterNotFoundError,
    StoreUnavailableError,
    adapter_record,
    adapter_version,
    replica_state,
    state_row,
    version_row,
)

log = logging.getLogger(__name__)
CHANNEL = "kimi_gateway_registry"
MIGRATION_LOCK = 0x6B696D69_67770001   # pg_advisory_lock key: "kimi" + "gw" + 1, fixed forever
CONNECT_TIMEOUT_S = 3.0
COMMAND_TIMEOUT_S = 5.0
RECONNECT_S = 0.5
OPEN_WAIT_S = 30.0

# (version, statements): append only; a released migration never changes.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
        CREATE TABLE adapter (
            name       TEXT PRIMARY KEY,
            seq        BIGSERIAL,
            spec       TEXT NOT NULL,
            origin     TEXT NOT NULL,
            active     TEXT,
            removed    BOOLEAN NOT NULL DEFAULT false,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE adapter_version (
            adapter       TEXT NOT NULL,
            version       TEXT NOT NULL,
            source        TEXT,
            gguf          TEXT,
            adapter_class TEXT NOT NULL,
            rank          INTEGER,
            status        TEXT NOT NULL,
            reason        TEXT,
            created_at    DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (adapter, version)
        );
        CREATE TABLE replica_state (
            adapter    TEXT NOT NULL,
            version    TEXT NOT NULL,
            backend    TEXT NOT NULL,
            replica    TEXT NOT NULL,
            state      TEXT NOT NULL,
            reason     TEXT,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (adapter, version, backend, replica)
        );
    """),
    (2, """
        CREATE TABLE lease (
            name       TEXT PRIMARY KEY,
            holder     TEXT NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
        );
    """),
)

UNREACHABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
               asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)


async def migrate(conn: asyncpg.Connection, migrations: tuple[tuple[int, str], ...] = MIGRATIONS,
                  table: str = "schema_migration") -> list[int]:
    """Apply every migration newer than the database's, under the advisory lock; returns those applied.
    Another module's schema (experiments) keeps its own numbering in its own `table`, under the same lock."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                           "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
        applied = []
        for version, statements in migrations:
            if version <= current:
                continue
            async with conn.transaction():
                await conn.execute(statements)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", version)
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


class PostgresPool:
    """A store's connection pool on the fleet's PostgreSQL: its migrations at open (waiting for a database that
    is not up yet), one transaction per call, NOTIFY on its channel at commit, every failure to reach the
    database as StoreUnavailableError. Subclasses name the channel, the migrations and how they log."""

    channel = CHANNEL
    migrations = MIGRATIONS
    migration_table = "schema_migration"
    what = "adapter store"        # in log lines

    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.writes = 0                  # local writes, at start and at end: a reader can tell its snapshot may be
        self.writing = 0                 # stale (AdapterStore.writes); and those in flight now
        self._pool: asyncpg.Pool | None = None
        self._watch_task: asyncio.Task | None = None

    async def open(self, wait_s: float = OPEN_WAIT_S) -> None:
        """Migrate, then open the pool. A database that is away at start is waited for (a fleet's replicas
        and its database often start together), for `wait_s`, then StoreUnavailableError."""
        conn = await connect_at_start(self.dsn, wait_s, self.what)
        try:
            applied = await migrate(conn, self.migrations, self.migration_table)
        finally:
            await conn.close()
        if applied:
            log.info("%s: applied migrations %s", self.what, applied)
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
    async def _transaction(self, notify: str | None = None, write: bool = False):
        """One transaction on a pooled connection; `notify` is announced on the channel when it commits."""
        counted = int(write or notify is not None)
        self.writes += counted
        self.writing += counted
        assert self._pool is not None, "the store is not open"
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                async with conn.transaction():
                    yield conn
                    if notify is not None:
                        await conn.execute("SELECT pg_notify($1, $2)", self.channel, notify)
        except UNREACHABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc
        finally:
            self.writes += counted
            self.writing -= counted


class PostgresStore(PostgresPool):
    """The adapter registry (module docstring)."""

    # --- change notification ----------------------------------------------------------------------------

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Call `on_change()` for every committed change (this replica's too), and once more every time
        the LISTEN connection comes back after a loss: then notifications may have been missed."""
        self._watch_task = asyncio.create_task(listen(self.dsn, CHANNEL, on_change, "adapter store"),
                                               name="adapter-store-listen")

    # --- the AdapterStore interface ---------------------------------------------------------------------

    async def seed(self, specs: Iterable[AdapterSpec]) -> list[str]:
        specs, now = list(specs), time.time()
        added = []
        async with self._transaction(notify="seed") as conn:
            for spec in specs:
                name = await conn.fetchval(
                    "INSERT INTO adapter (name, spec, origin, updated_at) VALUES ($1, $2, 'config', $3) "
                    "ON CONFLICT (name) DO NOTHING RETURNING name", spec.name, spec.model_dump_json(), now)
                if name is not None:
                    added.append(name)
        return added

    async def adapters(self) -> list[AdapterRecord]:
        async with self._transaction() as conn:
            return await self._adapters(conn)

    @staticmethod
    async def _adapters(conn: asyncpg.Connection) -> list[AdapterRecord]:
        rows = await conn.fetch(f"SELECT {ADAPTER_COLUMNS} FROM adapter WHERE NOT removed ORDER BY seq")
        return [adapter_record(row) for row in rows]

    async def add_adapter(self, spec: AdapterSpec, origin: str) -> AdapterRecord:
        now = time.time()
        async with self._transaction(notify=f"add {spec.name}") as conn:
            removed = await conn.fetchval("SELECT removed FROM adapter WHERE name = $1 FOR UPDATE", spec.name)
            if removed is False:
                raise AdapterExistsError(f"adapter {spec.name!r} is already registered")
            await conn.execute(
                "INSERT INTO adapter (name, spec, origin, active, removed, updated_at) "
                "VALUES ($1, $2, $3, NULL, false, $4) "
                "ON CONFLICT (name) DO UPDATE SET seq = DEFAULT, spec = EXCLUDED.spec, origin = EXCLUDED.origin, "
                "active = NULL, removed = false, updated_at = EXCLUDED.updated_at",
                spec.name, spec.model_dump_json(), origin, now)
        return AdapterRecord(spec, origin, None, now)

    async def remove_adapter(self, name: str) -> None:
        async with self._transaction(notify=f"remove {name}") as conn:
            changed = await conn.fetchval("UPDATE adapter SET removed = true, updated_at = $1 "
                                          "WHERE name = $2 AND NOT removed RETURNING name", time.time(), name)
            if changed is None:
                raise AdapterNotFoundError(name)

    async def put_version(self, version: AdapterVersion) -> None:
        async with self._transaction(notify=f"version {version.adapter}") as conn:
            await conn.execute(
                f"INSERT INTO adapter_version ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (adapter, version) DO UPDATE SET source = EXCLUDED.source, gguf = EXCLUDED.gguf, "
                "adapter_class = EXCLUDED.adapter_class, rank = EXCLUDED.rank, status = EXCLUDED.status, "
                "reason = EXCLUDED.reason, created_at = EXCLUDED.created_at", *version_row(version))

    async def versions(self, name: str | None = None) -> list[AdapterVersion]:
        async with self._transaction() as conn:
            return await self._versions(conn, name)

    @staticmethod
    async def _versions(conn: asyncpg.Connection, name: str | None = None) -> list[AdapterVersion]:
        query = (f"SELECT {VERSION_COLUMNS} FROM adapter_version" + (" WHERE adapter = $1" if name else "")
                 + " ORDER BY created_at")
        rows = await conn.fetch(query, *((name,) if name else ()))
        return [adapter_version(row) for row in rows]

    async def activate(self, version: AdapterVersion) -> AdapterRecord:
        """One transaction: the adapter points at `version` (its spec takes the version's files), the version
        is active and the one it replaces is retiring; every replica hears of it when it commits."""
        now = time.time()
        async with self._transaction(notify=f"activate {version.adapter}") as conn:
            row = await conn.fetchrow("SELECT spec, origin, active FROM adapter WHERE name = $1 AND NOT removed "
                                      "FOR UPDATE", version.adapter)
            if row is None:
                raise AdapterNotFoundError(version.adapter)
            spec = AdapterSpec.model_validate(json.loads(row["spec"]))
            spec = spec.model_copy(update={"source": version.source, "gguf": version.gguf})
            await conn.execute("UPDATE adapter SET spec = $1, active = $2, updated_at = $3 WHERE name = $4",
                               spec.model_dump_json(), version.version, now, version.adapter)
            if row["active"] and row["active"] != version.version:
                await conn.execute("UPDATE adapter_version SET status = $1 WHERE adapter = $2 AND version = $3",
                                   VersionStatus.RETIRING.value, version.adapter, row["active"])
            await conn.execute("UPDATE adapter_version SET status = $1, reason = NULL "
                               "WHERE adapter = $2 AND version = $3",
                               VersionStatus.ACTIVE.value, version.adapter, version.version)
            return AdapterRecord(spec, row["origin"], version.version, now)

    async def put_state(self, state: ReplicaState) -> None:
        s = state
        # Only `ready` lets other replicas forward to it; the steps before it are announced for views only
        # when they settle, so a load's progress does not wake every replica several times.
        notify = f"state {s.adapter}" if s.state in (ReplicaPhase.READY, ReplicaPhase.UNLOADED,
                                                      ReplicaPhase.FAILED) else None
        async with self._transaction(notify=notify, write=True) as conn:
            await conn.execute(
                f"INSERT INTO replica_state ({STATE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT (adapter, version, backend, replica) DO UPDATE SET "
                "state = EXCLUDED.state, reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at", *state_row(s))

    async def states(self, name: str | None = None) -> list[ReplicaState]:
        async with self._transaction() as conn:
            return await self._states(conn, name)

    @staticmethod
    async def _states(conn: asyncpg.Connection, name: str | None = None) -> list[ReplicaState]:
        query = (f"SELECT {STATE_COLUMNS} FROM replica_state" + (" WHERE adapter = $1" if name else "")
                 + " ORDER BY adapter, backend, replica")
        rows = await conn.fetch(query, *((name,) if name else ()))
        return [replica_state(row) for row in rows]

    async def snapshot(self) -> tuple[list[AdapterRecord], list[AdapterVersion], list[ReplicaState]]:
        """Adapters, versions and states as of one moment (one repeatable-read transaction)."""
        assert self._pool is not None, "the store is not open"
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    return await self._adapters(conn), await self._versions(conn), await self._states(conn)
        except UNREACHABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc

    # --- leases (adapters/lease.py PostgresLeases) -----------------------------------------------------

    async def take_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew `name` for `holder` unless another holder's lease is still running."""
        async with self._transaction() as conn:
            taken = await conn.fetchval(
                "INSERT INTO lease (name, holder, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3)) "
                "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at "
                "WHERE lease.holder = EXCLUDED.holder OR lease.expires_at < now() RETURNING holder",
                name, holder, ttl_s)
        return taken is not None

    async def drop_lease(self, name: str, holder: str) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM lease WHERE name = $1 AND holder = $2", name, holder)


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def connect_at_start(dsn: str, wait_s: float, what: str) -> asyncpg.Connection:
    """The first connection. A database that is away is waited for `wait_s` (a fleet's replicas and its
    database often start together); one that can never answer (a DSN that does not parse, a wrong password,
    no such database) fails at once. Both are a StoreUnavailableError whose message never holds the DSN."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        except asyncpg.ClientConfigurationError as exc:
            raise StoreUnavailableError(f"the PostgreSQL DSN is not valid: {describe(exc)}") from exc
        except UNREACHABLE as exc:
            if loop.time() >= deadline:
                raise StoreUnavailableError(f"PostgreSQL is unreachable: {describe(exc)}") from exc
            log.warning("%s: PostgreSQL is unreachable (%s); waiting for it", what, describe(exc))
            await asyncio.sleep(1.0)
        except asyncpg.PostgresError as exc:
            raise StoreUnavailableError(f"PostgreSQL refused the connection: {describe(exc)}") from exc


async def listen(dsn: str, channel: str, on_change: Callable[[], None], what: str) -> None:
    """LISTEN on `channel` for ever: `on_change()` for each notification, and once more each time the
    connection comes back after a loss (notifications may have been missed). Shared by every PostgreSQL store."""
    lost_before = False
    while True:
        closed = asyncio.Event()
        try:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
        except (*UNREACHABLE, asyncpg.PostgresError) as exc:
            if not lost_before:
                log.warning("%s: no LISTEN connection (%s); retrying", what, describe(exc))
            lost_before = True
            await asyncio.sleep(RECONNECT_S)
            continue
        try:
            conn.add_termination_listener(lambda _conn: closed.set())
            await conn.add_listener(channel, lambda *_args: on_change())
            if lost_before:
                log.warning("%s: LISTEN connection back; re-reading", what)
                on_change()
            lost_before = True   # from here on, any loss may have dropped notifications
            while not closed.is_set():
                try:
                    await asyncio.wait_for(closed.wait(), RECONNECT_S * 4)
                except TimeoutError:
                    await conn.execute("SELECT 1", timeout=CONNECT_TIMEOUT_S)   # a silent loss shows here
        except (*UNREACHABLE, asyncpg.PostgresError) as exc:
            log.warning("%s: LISTEN connection lost (%s)", what, describe(exc))
        finally:
            conn.terminate()
        await asyncio.sleep(RECONNECT_S)

"""The adapter stores (SQLite, PostgreSQL: the same tests for both): seeding, the atomic flip, what survives a
reopen; SQLite's v1 migration; PostgreSQL's migrations under their lock and its change notifications."""
import json
import sqlite3
import time

import pytest

from adapters.models import AdapterSpec, AdapterVersion, ReplicaPhase, ReplicaState, VersionStatus
from adapters.store import AdapterExistsError, AdapterNotFoundError, SqliteStore
from adapters.store_postgres import PostgresStore
from tests.services import fresh_database


def spec(name: str = "legal", source: str = "/a/v1") -> AdapterSpec:
    return AdapterSpec(name=name, source=source, backends=("kt",))


def version(digest: str, status=VersionStatus.CANDIDATE, source: str = "/a/v1") -> AdapterVersion:
    return AdapterVersion("legal", digest * 64, source, None, "attention", 8, status, time.time())


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request, tmp_path):
    """A factory for the store under test: each call opens another handle on the same storage."""
    if request.param == "sqlite":
        yield lambda: SqliteStore(tmp_path)
        return
    with fresh_database() as dsn:
        yield lambda: PostgresStore(dsn)


@pytest.fixture
async def store(make_store):
    store = make_store()
    await store.open()
    yield store
    await store.close()


async def test_seed_adds_once_and_removed_stays_removed(store):
    assert await store.seed([spec()]) == ["legal"]
    assert await store.seed([spec()]) == []
    await store.remove_adapter("legal")
    assert await store.seed([spec()]) == []
    assert await store.adapters() == []
    with pytest.raises(AdapterNotFoundError):
        await store.remove_adapter("legal")


async def test_add_refuses_a_live_name(store):
    await store.add_adapter(spec(), "admin")
    with pytest.raises(AdapterExistsError):
        await store.add_adapter(spec(), "admin")


async def test_activate_flips_in_one_write_and_survives_reopen(store, make_store):
    await store.add_adapter(spec(), "admin")
    old, new = version("a"), version("b", source="/a/v2")
    await store.put_version(old)
    await store.activate(old)
    await store.put_version(new)
    record = await store.activate(new)
    assert record.active == "b" * 64 and record.spec.source == "/a/v2"
    await store.put_state(ReplicaState("legal", new.version, "kt", "http://r0", ReplicaPhase.READY, None, 1.0))
    await store.close()
    reopened = make_store()
    await reopened.open()
    try:
        [record] = await reopened.adapters()
        statuses = {v.version[0]: v.status for v in await reopened.versions("legal")}
        states = await reopened.states("legal")
    finally:
        await reopened.close()
    assert record.active == "b" * 64 and record.spec.source == "/a/v2"
    assert statuses == {"a": VersionStatus.RETIRING, "b": VersionStatus.ACTIVE}
    assert [(s.replica, s.state) for s in states] == [("http://r0", ReplicaPhase.READY)]


async def test_the_first_registry_is_carried_over(tmp_path):
    with sqlite3.connect(tmp_path / "registry.sqlite3") as db:  # the v1 layout, as the first release wrote it
        db.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, spec TEXT NOT NULL, origin TEXT NOT NULL, "
                   "version INTEGER NOT NULL, removed INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL)")
        db.execute("INSERT INTO adapters VALUES ('legal', ?, 'admin', 3, 0, 1.0)", (json.dumps(spec().model_dump()),))
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        [record] = await store.adapters()
    finally:
        await store.close()
    assert record.spec.name == "legal" and record.origin == "admin" and record.active is None


def test_a_none_parameter_binds_null_through_the_registered_adapter():
    """adapters.store registers an adapter for None (the sqlite3 module's attribute search per None costs ~2k
    instructions); None must still bind as SQL NULL, in every column type, and read back as None."""
    assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)](None) is None
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (a TEXT, b INTEGER, c REAL)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?)", [(None, None, None), ("x", 1, 2.5)])
    assert db.execute("SELECT a IS NULL, b IS NULL, c IS NULL, typeof(a) FROM t ORDER BY rowid").fetchall() == [
        (1, 1, 1, "null"), (0, 0, 0, "text")]
    assert db.execute("SELECT a, b, c FROM t WHERE a IS NULL").fetchone() == (None, None, None)

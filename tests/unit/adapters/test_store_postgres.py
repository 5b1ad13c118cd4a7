"""What only the PostgreSQL store does: migrations once under their lock, change notifications, a clear error
when the database is away, and row leases (taken, refused, expired and taken over)."""
import asyncio
import time

import asyncpg
import pytest

from adapters.lease import LocalLeases, StoreLeases, holding, LeaseBusyError
from adapters.models import AdapterSpec
from adapters.store import StoreUnavailableError
from adapters.store_postgres import MIGRATIONS, PostgresStore
from gateway.experiments.postgres_store import PostgresExperimentStore
from tests.services import dsn_of, fresh_database


@pytest.fixture
def dsn():
    with fresh_database() as dsn:
        yield dsn


async def test_replicas_starting_together_run_each_migration_once(dsn):
    stores = [PostgresStore(dsn) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        conn = await asyncpg.connect(dsn)
        versions = [row["version"] for row in await conn.fetch("SELECT version FROM schema_migration ORDER BY 1")]
        await conn.close()
    finally:
        for store in stores:
            await store.close()
    assert versions == [version for version, _ in MIGRATIONS]


async def test_every_change_is_announced_to_every_replica(dsn):
    writer, listener = PostgresStore(dsn), PostgresStore(dsn)
    await writer.open()
    await listener.open()
    heard = asyncio.Event()
    try:
        await listener.watch(heard.set)
        await asyncio.sleep(0.3)   # LISTEN in place
        started = time.monotonic()
        await writer.add_adapter(AdapterSpec(name="legal", source="/a", backends=("kt",)), "admin")
        await asyncio.wait_for(heard.wait(), 1.0)
        assert time.monotonic() - started < 1.0
        [record] = (await listener.snapshot())[0]
        assert record.spec.name == "legal"
    finally:
        await writer.close()
        await listener.close()


async def test_an_unreachable_database_is_a_store_error_not_a_hang():
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/none")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        await store.open(wait_s=1.0)
    assert time.monotonic() - started < 5


async def test_a_lease_is_one_replicas_until_released_or_expired(dsn):
    store = PostgresStore(dsn)
    await store.open()
    try:
        first, second = StoreLeases(store, ttl_s=1.0), StoreLeases(store, ttl_s=1.0)
        assert await first.acquire("backend:kt", 0)
        assert not await second.acquire("backend:kt", 0)
        await asyncio.sleep(1.5)            # renewed while held: still the first's
        assert not await second.acquire("backend:kt", 0)
        await first.release("backend:kt")
        assert await second.acquire("backend:kt", 0)
        # the second "dies": its renewals stop, and the lease runs out for the first to take over
        second._renewals.pop("backend:kt").cancel()
        started = time.monotonic()
        assert await first.acquire("backend:kt", 3.0)
        assert 0.3 < time.monotonic() - started < 3.0
        await first.release("backend:kt")
    finally:
        await store.close()


async def test_local_leases_and_busy_errors():
    leases = LocalLeases()
    async with holding(leases, "adapter:legal", 1.0):
        with pytest.raises(LeaseBusyError, match="adapter legal"):
            async with holding(leases, "adapter:legal", 0.05):
                pass
    assert await leases.acquire("adapter:legal", 0)


@pytest.mark.parametrize("dsn, fragment", [
    ("not a dsn", "the PostgreSQL DSN is not valid"),
    (dsn_of("kgw_no_such_database"), 'PostgreSQL refused the connection: database "kgw_no_such_database"'),
    ("postgresql://kgw_no_such_role@127.0.0.1:5432/test", 'role "kgw_no_such_role" does not exist'),
])
async def test_a_database_that_can_never_answer_fails_at_once(dsn, fragment, caplog):
    """Not waited for as an unreachable one is (wait_s is an hour here): no "waiting for it" line, at once."""
    for store in (PostgresStore(dsn), PostgresExperimentStore(dsn)):
        with pytest.raises(StoreUnavailableError) as caught:
            await store.open(wait_s=3600)
        assert fragment in str(caught.value)
        assert "waiting for it" not in caplog.text

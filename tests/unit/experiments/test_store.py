"""Both ExperimentStores, SQLite and PostgreSQL (the machine's real one, a database per test): what they keep
survives closing and opening again (a restart); feedback is one per request and kind; retention purges facts with
their feedback. PostgreSQL only: replicas starting together migrate once; route changes are announced."""
from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from gateway.experiments.postgres_store import MIGRATIONS, PostgresExperimentStore
from gateway.experiments.sqlite_store import SqliteExperimentStore
from gateway.experiments.store import ExperimentEvent, Feedback, RequestFact, RouteOverride, ShadowCall
from tests.services import fresh_database


@pytest.fixture
def dsn():
    with fresh_database() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request, tmp_path):
    """A factory of stores over one place: each call is another process's (or a restarted one's) view of it."""
    if request.param == "sqlite":
        yield lambda: SqliteExperimentStore(tmp_path)
        return
    with fresh_database() as dsn:
        yield lambda: PostgresExperimentStore(dsn)


def fact(request_id: str, at: float, variant: str = "v1", status: int = 200, key: str = "team") -> RequestFact:
    return RequestFact(request_id, at, "legal", "legal", variant, f"{variant}@12345678", "gguf", key, status,
                       0.5, 0.1, 12, 7)


async def test_everything_survives_a_restart(new_store):
    store = new_store()
    await store.open()
    now = time.time()
    await store.put_route(RouteOverride("legal", {"name": "legal", "experiment": {"variants": {"v1": 80, "v2": 20}}}, now))
    await store.add_facts([fact("r1", now), fact("r2", now + 1, "v2", 503)],
                          [ShadowCall("r1", now, "legal", "v3", "v3@1", "gguf", 200, 1.5, 9, "ab" * 32, 40, None)])
    assert await store.add_feedback(Feedback("r1", "score", 0.75, now, {"grader": "human"}))
    await store.add_event(ExperimentEvent("legal", now, "rollback", "v2", "error rate"))
    await store.close()

    again = new_store()
    await again.open()
    try:
        assert [o.route["experiment"]["variants"] for o in await again.route_overrides()] == [{"v1": 80, "v2": 20}]
        assert await again.fact("r2") == fact("r2", now + 1, "v2", 503)
        rows = await again.experiment_facts("legal")
        assert [(r.variant, r.status, r.score, r.label) for r in rows] == [("v1", 200, 0.75, None), ("v2", 503, None, None)]
        assert [s.output_chars for s in await again.shadow_calls("legal")] == [40]
        assert [e.kind for e in await again.events("legal")] == ["rollback"]
    finally:
        await again.close()


async def test_feedback_is_one_per_request_and_kind(new_store):
    store = new_store()
    await store.open()
    try:
        now = time.time()
        await store.add_facts([fact("r1", now)], [])
        assert await store.add_feedback(Feedback("r1", "score", 1.0, now))
        assert await store.add_feedback(Feedback("r1", "label", 0.0, now))
        assert not await store.add_feedback(Feedback("r1", "score", 0.0, now))
        [row] = await store.experiment_facts("legal")
        assert (row.score, row.label) == (1.0, 0.0)
    finally:
        await store.close()


async def test_the_first_fact_of_a_request_id_wins_and_since_filters(new_store):
    store = new_store()
    await store.open()
    try:
        await store.add_facts([fact("r1", 100.0, key="owner")], [])
        await store.add_facts([fact("r1", 200.0, key="intruder"), fact("r2", 300.0)], [])
        assert (await store.fact("r1")).key == "owner"
        assert [r.at for r in await store.experiment_facts("legal", since=150.0)] == [300.0]
        assert await store.fact("missing") is None
    finally:
        await store.close()


async def test_purge_drops_old_facts_with_their_feedback_and_shadow_calls(new_store):
    store = new_store()
    await store.open()
    try:
        await store.add_facts([fact("old", 100.0), fact("new", 1000.0)],
                              [ShadowCall("old", 100.0, "legal", "v3", None, None, 0, 1.0, None, None, None, "x")])
        await store.add_feedback(Feedback("old", "label", 1.0, 100.0))
        assert await store.purge(500.0) == 3
        assert await store.fact("old") is None and await store.fact("new") is not None
        assert await store.shadow_calls("legal") == []
    finally:
        await store.close()


async def test_delete_route(new_store):
    store = new_store()
    await store.open()
    try:
        await store.put_route(RouteOverride("r", {"name": "r", "targets": ["b"]}, 1.0))
        assert await store.delete_route("r") and not await store.delete_route("r")
        assert await store.route_overrides() == []
    finally:
        await store.close()


async def test_postgres_replicas_starting_together_migrate_once(dsn):
    stores = [PostgresExperimentStore(dsn) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        conn = await asyncpg.connect(dsn)
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM experiment_schema_migration")]
        await conn.close()
    finally:
        for store in stores:
            await store.close()
    assert versions == [version for version, _ in MIGRATIONS]


async def test_postgres_route_changes_are_announced_to_other_replicas(dsn):
    writer, listener = PostgresExperimentStore(dsn), PostgresExperimentStore(dsn)
    await writer.open()
    await listener.open()
    heard = []
    changed = asyncio.Event()
    try:
        await listener.watch(lambda: (heard.append(1), changed.set()))
        await asyncio.sleep(0.3)     # the LISTEN connection is up
        await writer.add_facts([fact("r1", 1.0)], [])      # facts are not route changes: no announcement
        await writer.put_route(RouteOverride("r", {"name": "r", "targets": ["b"]}, 1.0))
        await asyncio.wait_for(changed.wait(), 1.0)
        changed.clear()
        assert await writer.delete_route("r")
        await asyncio.wait_for(changed.wait(), 1.0)
        assert len(heard) == 2
    finally:
        await writer.close()
        await listener.close()


async def test_postgres_a_route_change_through_one_replica_is_in_force_on_another_at_once(config, dsn):
    from gateway.config import GatewayConfig
    from gateway.experiments.service import ExperimentEvents, Experiments

    settings = GatewayConfig.model_validate({**config, "experiments": {"sync_interval_s": 60}})  # poll: no help
    one, two = (Experiments(settings, PostgresExperimentStore(dsn), ExperimentEvents()) for _ in range(2))
    await one.start()
    await two.start()
    rebuilt = asyncio.Event()
    two.on_routes_changed = rebuilt.set
    two.weights["legal"] = {"v1": 0.5, "v2": 0.5}       # adaptive weights of the old route
    try:
        await asyncio.sleep(0.3)     # the LISTEN connections are up
        route = two.route("legal")
        changed = route.model_copy(update={"experiment": route.experiment.model_copy(
            update={"variants": {"v1": 0, "v2": 100}})})
        await one.put_route(changed)
        await asyncio.wait_for(rebuilt.wait(), 1.0)
        assert two.route("legal").experiment.variants == {"v1": 0, "v2": 100}
        assert "legal" not in two.weights     # as after a local change: allocation starts afresh
        rebuilt.clear()
        assert await one.delete_route("legal")
        await asyncio.wait_for(rebuilt.wait(), 1.0)
        assert two.route("legal").experiment.variants == {"v1": 90, "v2": 10}   # the config's again
    finally:
        await one.aclose()
        await two.aclose()

"""Admin changes that race: each check and its write are one (Experiments.change_route, `claiming`), so of two
changes that cannot both hold, one is refused, whatever the interleaving, in one process, across worker
processes on one SQLite file, and across replicas on one PostgreSQL. Each test holds the first change inside
its store write (where the old code had already checked but not yet written) and sends the second meanwhile."""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from tests.services import fresh_database
from tests.unit.experiments.helpers import ADMIN, app

WAIT_S = 30.0   # a bound against hanging, not a timing claim


class HeldWrite:
    """Holds the next write of one store (its SQLite file or its PostgreSQL transactions) until released."""

    def __init__(self, store, method: str) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.armed = False
        real = getattr(store, method)

        async def held(*args, **kwargs):
            if self.armed and (method != "_run" or kwargs.get("write", True)):
                self.armed = False
                self.entered.set()
                await self.release.wait()
            return await real(*args, **kwargs)

        setattr(store, method, held)

    async def start(self, coroutine) -> asyncio.Task:
        """Run `coroutine` until it reaches the held write."""
        self.armed = True
        task = asyncio.create_task(coroutine)
        await asyncio.wait_for(asyncio.wait({task, asyncio.create_task(self.entered.wait())},
                                            return_when=asyncio.FIRST_COMPLETED), WAIT_S)
        assert not task.done(), task.result()
        return task


async def settled(task: asyncio.Task, lock: asyncio.Lock) -> None:
    """Until `task` is done or waits for `lock` (the route lock the held change holds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not task.done() and not getattr(lock, "_waiters", None):   # asyncio.Lock keeps its waiters there
        assert loop.time() < deadline, "the second change neither finished nor waited"
        await asyncio.sleep(0.01)


def experiment_store(client):
    return client._transport.app.state.experiments


async def in_force(client) -> dict:
    """Every experiment's variants and whether each is served: an adapter, or a route with targets."""
    adapters = {a["name"] for a in (await client.get("/admin/adapters", headers=ADMIN)).json()["data"]}
    routes = experiment_store(client).routes()
    bases = {r.name for r in routes if r.targets}
    return {r.name: {v: v in adapters or v in bases for v in r.experiment.variants} for r in routes if r.experiment}


def all_served(found: dict) -> bool:
    return all(all(variants.values()) for variants in found.values())


async def test_a_base_route_cannot_become_an_experiment_while_an_experiment_takes_it(config):
    async with app(config) as client:
        assert (await client.put("/admin/routes/base", json={"name": "base", "targets": ["one"]},
                                 headers=ADMIN)).status_code == 200
        experiments = experiment_store(client)
        held = HeldWrite(experiments.store, "_run")
        taking = await held.start(client.put("/admin/routes/exp", headers=ADMIN, json={
            "name": "exp", "experiment": {"variants": {"base": 1, "v1": 1}}}))
        turning = asyncio.create_task(client.put("/admin/routes/base", headers=ADMIN, json={
            "name": "base", "experiment": {"variants": {"v1": 1}}}))
        await settled(turning, experiments._change)
        held.release.set()
        taken, turned = await taking, await turning
        assert taken.status_code == 200, taken.text
        assert turned.status_code == 409 and "['exp']" in turned.json()["error"]["message"], turned.text
        assert all_served(await in_force(client)), await in_force(client)


async def test_a_base_route_cannot_be_removed_while_an_experiment_takes_it(config):
    async with app(config) as client:
        assert (await client.put("/admin/routes/base", json={"name": "base", "targets": ["one"]},
                                 headers=ADMIN)).status_code == 200
        experiments = experiment_store(client)
        held = HeldWrite(experiments.store, "_run")
        taking = await held.start(client.put("/admin/routes/exp", headers=ADMIN, json={
            "name": "exp", "experiment": {"variants": {"base": 1, "v1": 1}}}))
        removing = asyncio.create_task(client.delete("/admin/routes/base", headers=ADMIN))
        await settled(removing, experiments._change)
        held.release.set()
        taken, removed = await taking, await removing
        assert taken.status_code == 200 and removed.status_code == 409, (taken.text, removed.text)
        assert all_served(await in_force(client))


async def test_an_adapter_cannot_be_removed_while_an_experiment_takes_it(config):
    async with app(config) as client:
        assert (await client.put("/admin/routes/legal", json={"name": "legal", "experiment": {"variants": {"v1": 1}}},
                                 headers=ADMIN)).status_code == 200   # v2 is in no experiment now
        experiments = experiment_store(client)
        held = HeldWrite(experiments.store, "_run")
        taking = await held.start(client.put("/admin/routes/exp", headers=ADMIN, json={
            "name": "exp", "experiment": {"variants": {"v1": 1, "v2": 1}}}))
        removing = asyncio.create_task(client.delete("/admin/adapters/v2", headers=ADMIN))
        await settled(removing, experiments._change)
        held.release.set()
        taken, removed = await taking, await removing
        assert taken.status_code == 200 and removed.status_code == 409, (taken.text, removed.text)
        assert all_served(await in_force(client))


async def test_a_route_cannot_take_the_name_of_an_adapter_being_added(config):
    async with app(config) as client:
        lifecycle = client._transport.app.state.lifecycle
        held = HeldWrite(lifecycle.store, "add_adapter")
        gguf = (await client.get("/admin/adapters/v1", headers=ADMIN)).json()["gguf"]
        adding = await held.start(client.post("/admin/adapters", headers=ADMIN, json={
            "name": "v3", "gguf": gguf, "backends": ["one"]}))
        naming = await client.put("/admin/routes/v3", headers=ADMIN, json={"name": "v3", "targets": ["one"]})
        held.release.set()
        added = await adding
        assert added.status_code == 201, added.text
        assert naming.status_code == 422 and "an adapter's own route" in naming.json()["error"]["message"]
        assert (await client.get("/admin/routes/v3", headers=ADMIN)).status_code == 404


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request, monkeypatch):
    """The `store:` of two gateway processes that share it: one SQLite file (workers), one PostgreSQL (replicas)."""
    if request.param == "sqlite":
        yield {"kind": "sqlite"}
        return
    with fresh_database() as dsn:
        monkeypatch.setenv("KGW_RACE_DSN", dsn)
        yield {"kind": "postgres", "dsn_env": "KGW_RACE_DSN"}


async def test_two_processes_on_one_store_cannot_both_pass_a_check_only_one_may_pass(config, shared_store):
    """Two worker processes on one SQLite file, or two replicas on one PostgreSQL: the second has not heard of the
    first one's change yet (a worker hears at its next sync, a replica when the notification arrives: here its
    sync loop is stopped); its check reads the store inside the locked transaction, not its own memory."""
    config = {**config, "store": shared_store, "routes": [*config["routes"], {"name": "base", "targets": ["one"]}]}
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(app(config))
        second = await stack.enter_async_context(app(config))
        for task in experiment_store(second)._tasks:
            task.cancel()
        taken = await first.put("/admin/routes/exp", headers=ADMIN, json={
            "name": "exp", "experiment": {"variants": {"base": 1, "v1": 1}}})
        assert taken.status_code == 200, taken.text
        turned = await second.put("/admin/routes/base", headers=ADMIN, json={
            "name": "base", "experiment": {"variants": {"v1": 1}}})
        assert turned.status_code == 409 and "['exp']" in turned.json()["error"]["message"], turned.text
        assert all_served(await in_force(second))


async def test_a_promotion_keeps_a_change_made_while_it_swapped(config):
    """The promotion's weights are written over the route as it is at its end, not as it was at its start."""
    async with app(config) as client:
        lifecycle = client._transport.app.state.lifecycle
        held = HeldWrite(lifecycle.store, "put_version")   # the swap's first write: the new version
        promoting = await held.start(client.post("/admin/experiments/legal/promote", headers=ADMIN,
                                                 json={"variant": "v2"}))
        changed = {"name": "legal", "experiment": {"variants": {"v1": 50, "v2": 50}, "guard": {"min_requests": 7}}}
        assert (await client.put("/admin/routes/legal", headers=ADMIN, json=changed)).status_code == 200
        held.release.set()
        promoted = await promoting
        assert promoted.status_code == 200, promoted.text
        route = (await client.get("/admin/routes/legal", headers=ADMIN)).json()
        assert route["experiment"]["variants"] == {"v1": 100, "v2": 0}
        assert route["experiment"]["guard"]["min_requests"] == 7     # the change made meanwhile is still there

"""Two lifecycles (two gateway replicas) on one PostgreSQL store and one backend: what one registers, swaps
or removes the other mirrors, forwarding to what the first verified without loading it again; a candidate a
dead replica left is rolled back once its lease runs out.

The replicas' mirror loops run all along (as in a fleet), so a test waits for the state it expects (`until`),
never for a fixed time: under load a refresh or a lease's expiry comes later, never sooner."""
import asyncio
import contextvars
from typing import Callable

import pytest

from adapters.lease import StoreLeases
from adapters.lifecycle import AdapterLifecycle
from adapters.models import AdapterSpec, VersionStatus
from adapters.store_postgres import PostgresStore
from tests.adapter_files import write_peft
from tests.emulators.fake_driver import FakeDriver
from tests.services import fresh_database


class CountingDriver(FakeDriver):
    def __init__(self, name: str, shared: dict) -> None:
        super().__init__(name)
        self.loaded = shared   # one backend behind both replicas
        self.loads = 0

    async def load_adapter(self, replica, name, files, pinned=False) -> None:
        self.loads += 1
        await super().load_adapter(replica, name, files, pinned)


@pytest.fixture
def dsn():
    with fresh_database() as dsn:
        yield dsn


@pytest.fixture
def dirs(tmp_path):
    root = tmp_path / "adapters"
    return root, {v: write_peft(root / v, r=8 if v == "v1" else 4) for v in ("v1", "v2")}


async def replica(dsn, root, backend: dict, ttl_s: float = 10.0) -> tuple[AdapterLifecycle, CountingDriver]:
    store = PostgresStore(dsn)
    driver = CountingDriver("kt", backend)
    lifecycle = AdapterLifecycle(store, {"kt": driver}, roots=[str(root)], leases=StoreLeases(store, ttl_s=ttl_s))
    await lifecycle.start([], lambda spec: True)
    await lifecycle.reconcile_all()
    return lifecycle, driver


WAIT_S = 30.0   # how long a test waits for a state before it fails (a bound against hanging, not a timing claim)


async def until(what: str, condition: Callable[[], bool], refresh=None) -> None:
    """Wait for `condition` (after `refresh()`, when given, on every look); fail saying `what` if it never holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        if refresh is not None:
            await refresh()
        if condition():
            return
        if loop.time() > deadline:
            pytest.fail(f"{what}: not so after {WAIT_S:.0f} s")
        await asyncio.sleep(0.05)


async def test_a_change_on_one_replica_is_mirrored_by_the_other(dsn, dirs):
    root, paths = dirs
    backend: dict = {}
    (first, first_driver), (second, second_driver) = [await replica(dsn, root, backend) for _ in range(2)]
    try:
        await first.register(AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",)))
        [label] = [a.label for a in first.active()]
        await until("the second replica serves the registered version",
                    lambda: [a.label for a in second.active()] == [label] and list(second_driver.serving) == [label],
                    second.refresh)
        assert second_driver.loads == 0   # trusted, not reloaded
        assert await first.swap("legal", str(paths["v2"]), None)
        [new] = [a.label for a in first.active()]
        assert new != label
        await until("the second replica serves the swapped-in version only",
                    lambda: [a.label for a in second.active()] == [new] and list(second_driver.serving) == [new],
                    second.refresh)
        assert list(backend) == [new] and second_driver.loads == 0
        await second.remove("legal")
        await until("the first replica serves nothing", lambda: first.active() == [] and first_driver.serving == {},
                    first.refresh)
        assert backend == {}
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_candidate_left_by_a_dead_replica_is_rolled_back_after_its_lease(dsn, dirs):
    root, paths = dirs
    backend: dict = {}
    # A lease far longer than a loaded machine's pause: "still running" below is certain, whatever the load.
    (first, _), (second, _) = [await replica(dsn, root, backend, ttl_s=WAIT_S) for _ in range(2)]
    try:
        await first.register(AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",)))
        # The first replica "dies" holding the adapter, half way through a swap: a candidate is loaded.
        assert await first.leases.acquire("adapter:legal", 0)
        first.leases._renewals.pop("adapter:legal").cancel()
        candidate = first._new_version(first.records["legal"].spec.model_copy(update={"source": str(paths["v2"])}),
                                       await first._validate(str(paths["v2"]), None, ("kt",)))
        await first._bring_in(candidate, ("kt",))
        assert candidate.label in backend
        await second.refresh()
        await second.settle()   # the lease is still running: hands off
        assert second.versions["legal"][candidate.version].status is VersionStatus.CANDIDATE
        # Its last renewal, just before it died, was for a short lease: once that runs out, the second takes over.
        assert await first.store.take_lease("adapter:legal", first.leases.holder, 0.5)
        await until("the candidate is rolled back once the lease ran out",
                    lambda: second.versions["legal"][candidate.version].status is VersionStatus.FAILED,
                    lambda: refresh_and_settle(second))
        assert candidate.label not in backend and len(second.active()) == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_converted_version_is_served_from_its_conversion_on_the_other_replica_too(dsn, dirs, tmp_path):
    """The store keeps what was registered; each replica serves what conversion made of it (here one shared
    conversion cache, so the second replica's conversion is a cache hit)."""
    from tests.adapter_files import write_kt_sft
    from tests.unit.adapters.test_lifecycle import COPY_PEFT, SglangLikeDriver, kt_converter

    root, paths = dirs
    checkpoint = write_kt_sft(root / "kt-sft")
    converter = kt_converter(tmp_path, COPY_PEFT + f"\nopen({str(tmp_path / 'runs')!r}, 'a').write('x')\n")
    backend: dict = {}
    replicas = []
    for _ in range(2):
        store = PostgresStore(dsn)
        driver = SglangLikeDriver("kt")
        driver.loaded = backend
        lifecycle = AdapterLifecycle(store, {"kt": driver}, roots=[str(root)], leases=StoreLeases(store),
                                     converter=converter)
        await lifecycle.start([], lambda spec: True)
        replicas.append((lifecycle, driver))
    (first, first_driver), (second, second_driver) = replicas
    try:
        await first.register(AdapterSpec(name="neko", source=str(checkpoint), backends=("kt",)))
        await first.refresh()    # a refresh of its own must not lose what it converted
        await second.refresh()
        converted = str(tmp_path / "cache" / first.records["neko"].active / "sglang")
        for driver in (first_driver, second_driver):
            assert [files.source for files in driver.serving.values()] == [converted]
        assert second.view("neko")["source"] == str(checkpoint)
        assert (tmp_path / "runs").read_text() == "x"
    finally:
        await first.aclose()
        await second.aclose()


async def refresh_and_settle(lifecycle: AdapterLifecycle) -> None:
    await lifecycle.refresh()
    await lifecycle.settle()


PAUSED = contextvars.ContextVar("paused", default=False)


async def test_a_refresh_never_applies_an_older_snapshot_over_a_newer_one(dsn, dirs):
    """Two refreshes at once (the mirror loop's and an operation's): the one that read the store first must not
    apply last. Here the first read is held until the second refresh has had its chance to finish."""
    root, paths = dirs
    backend: dict = {}
    (first, _), (second, _) = [await replica(dsn, root, backend) for _ in range(2)]
    read, go_on = asyncio.Event(), asyncio.Event()
    snapshot = second.store.snapshot

    async def held_snapshot():
        taken = await snapshot()
        if PAUSED.get():
            read.set()
            await go_on.wait()
        return taken

    second.store.snapshot = held_snapshot
    try:
        context = contextvars.copy_context()
        context.run(PAUSED.set, True)
        older = asyncio.create_task(second.refresh(), context=context)   # reads the store before the change
        await read.wait()
        await first.register(AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",)))
        [label] = [a.label for a in first.active()]
        newer = asyncio.create_task(second.refresh())
        await asyncio.wait({newer}, timeout=1.0)   # unfixed, it reads and applies the change now
        go_on.set()
        await asyncio.gather(older, newer)
        assert [a.label for a in second.active()] == [label]
    finally:
        go_on.set()
        await first.aclose()
        await second.aclose()


async def test_a_refresh_that_lands_while_a_remove_writes_does_not_break_the_remove(dsn, dirs):
    """The mirror loop hears the remove's own notification and may apply the store's state (the adapter gone)
    before the remove does its own bookkeeping: the remove must still finish, and the adapter be gone."""
    root, paths = dirs
    backend: dict = {}
    (first, _), (second, second_driver) = [await replica(dsn, root, backend) for _ in range(2)]
    remove_adapter = second.store.remove_adapter

    async def remove_then_mirror(name: str) -> None:
        await remove_adapter(name)
        await second.refresh()      # what the mirror loop does on the notification, at the worst moment

    second.store.remove_adapter = remove_then_mirror
    try:
        await first.register(AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",)))
        await until("the second replica has the adapter", lambda: second.names() == ["legal"], second.refresh)
        await second.remove("legal")
        assert second.names() == [] and second.active() == [] and second_driver.serving == {} and backend == {}
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_snapshot_read_while_a_write_of_ours_commits_is_read_again(dsn, dirs):
    """A replica's own flip is in flight (its transaction begun, not committed) when a refresh reads the store: the
    refresh must not apply what it read (the adapter without its active version) once the flip is done."""
    from contextlib import asynccontextmanager

    root, paths = dirs
    first, _ = await replica(dsn, root, {})
    first._mirror_task.cancel()   # the refresh below plays its part, at the worst moment
    flipping, commit, read, applied = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    transaction, snapshot = first.store._transaction, first.store.snapshot

    @asynccontextmanager
    async def held_transaction(notify=None, write=False):
        async with transaction(notify, write) as conn:
            yield conn
            if notify is not None and notify.startswith("activate"):
                flipping.set()
                await commit.wait()

    async def held_snapshot():
        taken = await snapshot()
        if PAUSED.get():
            read.set()
            await applied.wait()
        return taken

    first.store._transaction, first.store.snapshot = held_transaction, held_snapshot
    try:
        registering = asyncio.create_task(first.register(AdapterSpec(name="legal", source=str(paths["v1"]),
                                                                     backends=("kt",))))
        await flipping.wait()
        context = contextvars.copy_context()
        context.run(PAUSED.set, True)
        refreshing = asyncio.create_task(first.refresh(), context=context)
        await read.wait()          # it read the store while the flip was not committed
        commit.set()
        await registering          # the flip is committed and applied
        applied.set()
        await refreshing
        assert [a.spec.name for a in first.active()] == ["legal"]
    finally:
        commit.set()
        applied.set()
        await first.aclose()

"""The lifecycle with scripted drivers: a swap verifies before it flips, rolls back on any failure (the old
version keeps serving), drains and unloads the old one; a replica that lost its adapters gets them back."""
import pytest

from adapters.errors import AdapterPlacementError
from adapters.lifecycle import AdapterLifecycle
from adapters.models import AdapterSpec, ReplicaPhase, VersionStatus
from adapters.store import SqliteStore
from backends.errors import BackendRejectedError
from tests.adapter_files import write_peft
from tests.emulators.fake_driver import FakeDriver


class BaseLikeDriver(FakeDriver):
    """An adapter that 'loads' but changes nothing: its probe answers like the base model."""

    async def probe(self, replica, adapter, files=None) -> str:
        return "base answer" if adapter is None or "v2" in str(files.source) else f"probe {adapter}"


class RefusingDriver(FakeDriver):
    async def load_adapter(self, replica, name, files, pinned=False) -> None:
        if "v2" in str(files.source):
            raise BackendRejectedError("no room", status=502, backend=self.name)
        await super().load_adapter(replica, name, files, pinned)


@pytest.fixture
def dirs(tmp_path):
    root = tmp_path / "adapters"
    return root, {v: write_peft(root / v, r=8 if v == "v1" else 4) for v in ("v1", "v2")}


async def started(tmp_path, dirs, driver) -> AdapterLifecycle:
    root, paths = dirs
    lifecycle = AdapterLifecycle(SqliteStore(tmp_path / "state"), {"kt": driver}, roots=[str(root)])
    await lifecycle.start([AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",))], lambda s: True)
    await lifecycle.reconcile_all()
    return lifecycle


async def test_swap_flips_then_unloads_the_old_version(tmp_path, dirs):
    driver = FakeDriver("kt")
    lifecycle = await started(tmp_path, dirs, driver)
    try:
        [before] = lifecycle.active()
        assert list(driver.serving) == [before.label]
        assert await lifecycle.swap("legal", str(dirs[1]["v2"]), None) is True
        [after] = lifecycle.active()
        assert after.label != before.label and list(driver.loaded) == [after.label]
        statuses = {v["short"]: v["status"] for v in lifecycle.view("legal")["versions"]}
        assert statuses == {before.label[-8:]: "retired", after.label[-8:]: "active"}
        assert await lifecycle.swap("legal", str(dirs[1]["v2"]), None) is False  # same files: nothing to do
    finally:
        await lifecycle.aclose()


@pytest.mark.parametrize("driver_class, reason", [(BaseLikeDriver, "answers exactly like the base model"),
                                                  (RefusingDriver, "no room")])
async def test_a_failed_swap_rolls_back_and_the_old_version_serves(tmp_path, dirs, driver_class, reason):
    driver = driver_class("kt")
    lifecycle = await started(tmp_path, dirs, driver)
    try:
        [before] = lifecycle.active()
        with pytest.raises(AdapterPlacementError, match=reason):
            await lifecycle.swap("legal", str(dirs[1]["v2"]), None)
        assert lifecycle.active() == [before] and list(driver.serving) == [before.label]
        assert list(driver.loaded) == [before.label]  # the new version was unloaded again
        failed = [v for v in lifecycle.view("legal")["versions"] if v["status"] == VersionStatus.FAILED]
        assert len(failed) == 1 and reason in failed[0]["reason"]
    finally:
        await lifecycle.aclose()


async def test_a_replica_that_lost_its_adapters_gets_them_back(tmp_path, dirs):
    driver = FakeDriver("kt")
    lifecycle = await started(tmp_path, dirs, driver)
    try:
        [active] = lifecycle.active()
        driver.loaded.clear()  # what a restarted SGLang reports
        await lifecycle.reconcile("kt", 0)
        assert list(driver.loaded) == [active.label] and list(driver.serving) == [active.label]
        states = [r["state"] for r in lifecycle.view("legal")["replicas"]]
        assert states == [ReplicaPhase.READY]
    finally:
        await lifecycle.aclose()

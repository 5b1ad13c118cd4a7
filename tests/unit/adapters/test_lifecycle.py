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


# --- the conversion step (a stand-in tool; the real converters run in test_conversion_live.py) --------------

class SglangLikeDriver(FakeDriver):
    kind = "sglang"


def kt_converter(tmp_path, body: str):
    from adapters.conversion import ConversionSettings, ToolConverter
    from tests.unit.adapters.test_conversion import stand_in

    return ToolConverter(ConversionSettings(cache_dir=tmp_path / "cache", kt_python=stand_in(tmp_path, body),
                                            kt_script="convert_kt_to_sglang_adapter.py"))


COPY_PEFT = """
import shutil, sys
print('Converted KT fused expert LoRA adapter')
shutil.copytree(sys.argv[1].replace('kt-sft', 'v2'), sys.argv[2])
"""


async def test_a_kt_sft_swap_is_converted_then_served_from_the_conversion(tmp_path, dirs):
    from tests.adapter_files import write_kt_sft

    root, paths = dirs
    checkpoint = write_kt_sft(root / "kt-sft")
    driver = SglangLikeDriver("kt")
    lifecycle = AdapterLifecycle(SqliteStore(tmp_path / "state"), {"kt": driver}, roots=[str(root)],
                                 converter=kt_converter(tmp_path, COPY_PEFT))
    await lifecycle.start([AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",))], lambda s: True)
    try:
        assert await lifecycle.swap("legal", str(checkpoint), None) is True
        view = lifecycle.view("legal")
        active = next(v for v in view["versions"] if v["status"] == "active")
        assert active["source"] == str(checkpoint)   # what was registered stays what is shown and stored
        assert active["converted"] == {"source": str(tmp_path / "cache" / active["version"] / "sglang")}
        assert view["class"] == "experts" and view["source"] == str(checkpoint)
        assert [files.source for files in driver.serving.values()] == [active["converted"]["source"]]
        phases = [s.state for k, s in lifecycle.states.items() if k[1] == active["version"]]
        assert phases == [ReplicaPhase.READY]
    finally:
        await lifecycle.aclose()


async def test_a_failed_conversion_leaves_the_version_failed_with_the_tools_last_lines(tmp_path, dirs):
    from adapters.conversion import ConversionError
    from tests.adapter_files import write_kt_sft

    root, paths = dirs
    checkpoint = write_kt_sft(root / "kt-sft")
    driver = SglangLikeDriver("kt")
    crash = ("import sys\nprint('Traceback (most recent call last):')\n"
             "print('ValueError: Inconsistent LoRA ranks')\nsys.exit(1)")
    lifecycle = AdapterLifecycle(SqliteStore(tmp_path / "state"), {"kt": driver}, roots=[str(root)],
                                 converter=kt_converter(tmp_path, crash))
    await lifecycle.start([AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",))], lambda s: True)
    try:
        [before] = lifecycle.active()
        with pytest.raises(ConversionError, match="failed \\(exit 1\\)(.|\n)*ValueError: Inconsistent LoRA ranks"):
            await lifecycle.swap("legal", str(checkpoint), None)
        assert lifecycle.active() == [before] and list(driver.loaded) == [before.label]
        failed = [v for v in lifecycle.view("legal")["versions"] if v["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["reason"].endswith("ValueError: Inconsistent LoRA ranks")
        assert {s.state for k, s in lifecycle.states.items() if k[1] == failed[0]["version"]} == {ReplicaPhase.FAILED}
        with pytest.raises(ConversionError):   # a registration: nothing of it stays registered
            await lifecycle.register(AdapterSpec(name="neko", source=str(checkpoint), backends=("kt",)))
        assert lifecycle.names() == ["legal"]
        assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != "logs"] == [failed[0]["version"]]
        assert list((tmp_path / "cache" / failed[0]["version"]).iterdir()) == []
    finally:
        await lifecycle.aclose()


async def test_a_config_adapter_converts_at_start_once_and_again_if_the_cache_is_cleared(tmp_path, dirs):
    import shutil

    from tests.adapter_files import write_kt_sft

    root, _ = dirs
    checkpoint = write_kt_sft(root / "kt-sft")
    counting = COPY_PEFT + f"\nopen({str(tmp_path / 'runs')!r}, 'a').write('x')\n"
    spec = AdapterSpec(name="neko", source=str(checkpoint), backends=("kt",))
    for attempt in range(3):
        if attempt == 2:
            shutil.rmtree(tmp_path / "cache")
        driver = SglangLikeDriver("kt")
        lifecycle = AdapterLifecycle(SqliteStore(tmp_path / "state"), {"kt": driver}, roots=[str(root)],
                                     converter=kt_converter(tmp_path, counting))
        await lifecycle.start([spec], lambda s: True)
        try:
            await lifecycle.reconcile_all()
            [active] = lifecycle.active()
            assert [files.source for files in driver.serving.values()] == \
                [str(tmp_path / "cache" / lifecycle.records["neko"].active / "sglang")]
        finally:
            await lifecycle.aclose()
    assert (tmp_path / "runs").read_text() == "xx"   # the first start and the one after the cache was cleared


async def test_a_running_conversion_shows_its_latest_line(tmp_path, dirs):
    import asyncio

    from tests.adapter_files import write_kt_sft

    root, paths = dirs
    checkpoint = write_kt_sft(root / "kt-sft")
    slow = "import time\nprint('Loading fused expert LoRA', flush=True)\ntime.sleep(2)\n" + COPY_PEFT
    lifecycle = AdapterLifecycle(SqliteStore(tmp_path / "state"), {"kt": SglangLikeDriver("kt")}, roots=[str(root)],
                                 converter=kt_converter(tmp_path, slow))
    await lifecycle.start([AdapterSpec(name="legal", source=str(paths["v1"]), backends=("kt",))], lambda s: True)
    try:
        swap = asyncio.create_task(lifecycle.swap("legal", str(checkpoint), None))
        seen = set()
        while not swap.done():
            seen |= {(r["state"], r["reason"]) for r in lifecycle.view("legal")["replicas"]
                     if r["state"] == "converting"}
            await asyncio.sleep(0.05)
        assert await swap is True
        assert ("converting", "convert_kt_to_sglang_adapter.py: Loading fused expert LoRA") in seen
    finally:
        await lifecycle.aclose()

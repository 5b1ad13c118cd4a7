"""FactLog: facts are written in batches by a background task; a full queue drops new facts and counts them;
a write that fails keeps its facts for the next try; closing writes what is left."""
from __future__ import annotations

import asyncio

from gateway.experiments.config import ExperimentsConfig
from gateway.experiments.facts import FactLog


class MemoryStore:
    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list] = []
        self.fail = fail

    async def add_facts(self, facts, shadows) -> None:
        await asyncio.sleep(0)
        if self.fail:
            self.fail -= 1
            raise OSError("disk full")
        self.batches.append(list(facts))


def record(log: FactLog, request_id: str, status: int = 200) -> None:
    log.record(request_id, "legal", "legal", "v1", "v1@1", "gguf", "team", status, 0.2, 0.05,
               {"prompt_tokens": 5, "completion_tokens": 3})


async def test_facts_are_written_in_batches_in_order():
    store = MemoryStore()
    log = FactLog(store, ExperimentsConfig(batch_size=4, flush_interval_s=0.05))
    log.start()
    for i in range(10):
        record(log, f"r{i}")
    await asyncio.sleep(0.3)
    await log.aclose()
    assert [len(b) for b in store.batches] == [4, 4, 2]
    written = [f for batch in store.batches for f in batch]
    assert [f.request_id for f in written] == [f"r{i}" for i in range(10)]
    assert (written[0].prompt_tokens, written[0].completion_tokens, written[0].experiment) == (5, 3, "legal")


async def test_a_full_queue_drops_new_facts_and_counts_them():
    dropped = []
    store = MemoryStore()
    log = FactLog(store, ExperimentsConfig(queue_size=5, batch_size=100), on_dropped=dropped.append)
    for i in range(8):       # the writer is not running: the store is "slow"
        record(log, f"r{i}")
    assert log.dropped == 3 and sum(dropped) == 3
    await log.flush()
    assert [f.request_id for f in store.batches[0]] == ["r0", "r1", "r2", "r3", "r4"]


async def test_a_failed_write_keeps_the_facts_for_the_next_try():
    store = MemoryStore(fail=1)
    log = FactLog(store, ExperimentsConfig(batch_size=10, flush_interval_s=0.02))
    log.start()
    record(log, "r1")
    record(log, "r2")
    await asyncio.sleep(0.2)
    await log.aclose()
    assert [f.request_id for b in store.batches for f in b] == ["r1", "r2"]


async def test_the_writer_tells_which_experiments_got_facts():
    seen = []
    log = FactLog(MemoryStore(), ExperimentsConfig(), on_batch=seen.append)
    record(log, "r1")
    log.record("r2", "kimi", None, None, None, "gguf", "", 200, 0.1, 0.1, None)
    await log.flush()
    assert [[f.request_id for f in batch] for batch in seen] == [["r1"]]


async def test_only_experiment_requests_when_so_configured():
    store = MemoryStore()
    log = FactLog(store, ExperimentsConfig(record="experiments"))
    record(log, "r1")
    log.record("r2", "kimi", None, None, None, "gguf", "", 200, 0.1, 0.1, None)
    await log.flush()
    assert [f.request_id for b in store.batches for f in b] == ["r1"]

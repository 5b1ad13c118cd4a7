"""What experiments add to the hot path, per request, in isolation (min of several runs: the machine is shared):

- Split.pick: the sticky variant pick (hash + bisect);
- FactLog.record: a request's facts appended to the write queue (every request pays this);
- ShadowMirror.pick: the shadow dice for an experiment route without and with a shadow candidate;
- and the writer's cost per fact (a batch of 500 into SQLite, on its own thread, off the event loop).

    python bench/experiments_micro.py
"""
from __future__ import annotations

import asyncio
import tempfile
import time
import timeit
from pathlib import Path

import checkout
checkout.use()  # this checkout's packages, not the venv's installed ones
from backends.base import BackendRequest
from gateway.experiments.config import ExperimentConfig, ExperimentsConfig
from gateway.experiments.facts import FactLog
from gateway.experiments.shadow import ShadowMirror
from gateway.experiments.split import Split
from gateway.experiments.sqlite_store import SqliteExperimentStore

N = 200_000


def per_call_us(statement, number: int = N) -> float:
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


class Route:
    def __init__(self, name: str, experiment: ExperimentConfig) -> None:
        self.name, self.experiment = name, experiment


def main() -> None:
    split = Split("legal", {"legal-v1": 90, "legal-v2": 10})
    users = [f"user-{i}" for i in range(1000)]
    index = iter(range(10**9))
    print(f"Split.pick (sticky on user):           {per_call_us(lambda: split.pick(users[next(index) % 1000])):.2f} µs")

    log = FactLog(object(), ExperimentsConfig(queue_size=N * 6, batch_size=N * 6))
    usage = {"prompt_tokens": 9, "completion_tokens": 2}
    record = log.record
    print("FactLog.record (queue append):         "
          f"{per_call_us(lambda: record('0123456789abcdef01234567', 'legal', 'legal', 'v1', 'v1@12345678', 'gguf', 'team', 200, 0.1, 0.05, usage)):.2f} µs")

    request = BackendRequest(path="/v1/chat/completions", body={"model": "legal", "messages": []}, model="legal",
                             route="legal-v1", adapter=None, thinking=True)
    mirror = ShadowMirror({}, lambda: None, log, {}, lambda *a: None)
    plain = Route("legal", ExperimentConfig(variants={"v1": 1}))
    shadowed = Route("legal", ExperimentConfig(variants={"v1": 1}, shadow={"v3": 0.05}))
    print(f"ShadowMirror.pick, no shadow:          {per_call_us(lambda: mirror.pick(plain, request)):.2f} µs")
    print(f"ShadowMirror.pick, a 5% shadow:        {per_call_us(lambda: mirror.pick(shadowed, request)):.2f} µs")

    async def writer() -> float:
        store = SqliteExperimentStore(Path(tempfile.mkdtemp()))
        await store.open()
        facts = FactLog(store, ExperimentsConfig(queue_size=100_000, batch_size=500))
        for i in range(50_000):
            facts.record(f"{i:024x}", "legal", "legal", "v1", "v1@12345678", "gguf", "team", 200, 0.1, 0.05, usage)
        started = time.process_time()
        await facts.flush()
        spent = time.process_time() - started
        await store.close()
        return spent / 50_000 * 1e6
    print(f"writer, per fact (SQLite, off-loop):   {asyncio.run(writer()):.2f} µs CPU")


if __name__ == "__main__":
    main()

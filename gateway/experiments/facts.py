"""FactLog: request facts and shadow calls, written to the store off the hot path.

The data plane's only cost is `record()`: one RequestFact (a tuple, the row as stored) appended to a bounded
deque. A background task drains the deque in batches, one store transaction each, every `flush_interval_s` or as
soon as a batch is full. Past `queue_size` waiting facts (the store is slower than the traffic) new facts are
dropped and counted (`kimi_gateway_request_facts_dropped_total`), never waited for.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable, Iterable

from gateway.experiments.config import ExperimentsConfig
from gateway.experiments.store import ExperimentStore, RequestFact, ShadowCall

log = logging.getLogger(__name__)


class FactLog:
    def __init__(self, store: ExperimentStore, config: ExperimentsConfig, *,
                 on_dropped: Callable[[int], None] = lambda n: None,
                 on_batch: Callable[[list[RequestFact]], None] = lambda facts: None) -> None:
        self.store = store
        self.limit = config.queue_size
        self.only_experiments = config.record == "experiments"
        self.batch_size = config.batch_size
        self.interval_s = config.flush_interval_s
        self.on_dropped = on_dropped
        self.on_batch = on_batch
        self._facts: deque[RequestFact] = deque()
        self._shadows: deque[ShadowCall] = deque()
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self.written = 0

    # --- the hot path ---------------------------------------------------------------------------

    def record(self, request_id: str, route: str, experiment: str | None, variant: str | None, adapter: str | None,
               backend: str | None, key: str, status: int, latency_s: float, ttft_s: float | None,
               usage: dict | None) -> None:
        if experiment is None and self.only_experiments:
            return
        if len(self._facts) >= self.limit:
            self.dropped += 1
            self.on_dropped(1)
            return
        prompt = completion = None
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        # The row as the store writes it, built once here: the writer passes batches of them through as they are.
        self._facts.append(RequestFact(request_id, time.time(), route, experiment, variant, adapter, backend, key,
                                       status, latency_s, ttft_s, prompt if isinstance(prompt, int) else None,
                                       completion if isinstance(completion, int) else None))
        if len(self._facts) == self.batch_size:
            self._wakeup.set()

    def shadow(self, call: ShadowCall) -> None:
        if len(self._shadows) >= self.limit:
            self.dropped += 1
            self.on_dropped(1)
            return
        self._shadows.append(call)

    # --- the writer -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="fact-writer")

    async def aclose(self) -> None:
        """Stop the writer and write what is left (a clean shutdown loses nothing)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Everything recorded so far is in the store when this returns (feedback right after an answer)."""
        async with self._lock:
            while self._facts or self._shadows:
                await self._write_batch()

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:   # the store is down or full: keep the queue bounded and try again later
                log.exception("writing request facts failed; %d waiting", len(self._facts))

    async def _write_batch(self) -> None:
        facts = [self._facts.popleft() for _ in range(min(self.batch_size, len(self._facts)))]
        shadows = [self._shadows.popleft() for _ in range(min(self.batch_size, len(self._shadows)))]
        try:
            await self.store.add_facts(facts, shadows)
        except BaseException:
            self._requeue(facts, shadows)
            raise
        self.written += len(facts)
        written = [fact for fact in facts if fact.experiment]
        if written:
            self.on_batch(written)     # the experiments' facts, once stored (the canary guard's input)

    def _requeue(self, facts: Iterable[RequestFact], shadows: Iterable[ShadowCall]) -> None:
        """A failed write goes back to the front, as far as the bound allows."""
        for fact in reversed(list(facts)):
            if len(self._facts) < self.limit:
                self._facts.appendleft(fact)
        for call in reversed(list(shadows)):
            if len(self._shadows) < self.limit:
                self._shadows.appendleft(call)


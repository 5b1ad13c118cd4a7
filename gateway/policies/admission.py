"""AdmissionQueue: requests beyond a backend's slots wait here instead of piling onto the backend.

One queue per backend whose replicas declare slots (`max_concurrency`, or what the servers report). A
request first asks the driver for a free slot (`reserve`); only when every replica that could take it is
full, or others already wait, does it queue. Order: priority classes first (high, normal, low: strictly),
then round-robin between client keys within a class, so no tenant starves another however many requests
it sends; FIFO within a key. A slot that frees (the driver's `on_capacity`) goes to the first waiter in that
order whose adapter has a free slot somewhere, so one adapter's full replicas do not block the others.

The queue is bounded (`admission.max_queue`): past it a request gets 429 with `retry-after`, or the route's
next target. The request's deadline is enforced around the whole request by the data plane (a deadline
that passes here is a 429 and the request never reaches the backend). While a stream waits, `keepalive`
is called every `keepalive_s` (the data plane sends the response head and an SSE comment).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Awaitable, Callable

from gateway.errors import InvalidRequestError, OverloadedError

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
NORMAL = PRIORITIES["normal"]


def priority_of(key_priority: str, header: bytes | None) -> int:
    """The key's class, or a lower one asked for in `x-kimi-priority` (a client may yield, never jump: `high`
    from a normal key is normal). Case and surrounding spaces do not matter; any other value is a 400, so that
    a typo never leaves a client believing it yielded."""
    own = PRIORITIES.get(key_priority, NORMAL)
    if header is None:
        return own
    asked = PRIORITIES.get(header.decode("latin-1").strip().lower())
    if asked is None:
        raise InvalidRequestError("x-kimi-priority must be one of high, normal, low.", param="x-kimi-priority")
    return max(own, asked)


class Waiter:
    __slots__ = ("adapter", "key", "priority", "future", "since")

    def __init__(self, adapter: str | None, key: str, priority: int, future: asyncio.Future) -> None:
        self.adapter, self.key, self.priority, self.future = adapter, key, priority, future
        self.since = time.perf_counter()


class QueueEvents:
    """Where the queue reports (gateway/metrics.py QueueRecorder); this one records nothing."""

    def length(self, length: int) -> None: ...
    def waited(self, seconds: float, outcome: str) -> None: ...


class AdmissionQueue:
    def __init__(self, backend: str, reserve: Callable[[str | None], object | None], has_room: Callable[[], bool],
                 *, max_length: int, retry_after_s: int = 1, events: QueueEvents | None = None) -> None:
        self.backend = backend
        self.length = 0
        self.max_length = max_length
        self.retry_after_s = retry_after_s
        self._reserve = reserve
        self._has_room = has_room
        self._events = events or QueueEvents()
        self._classes: list[OrderedDict[str, deque[Waiter]]] = [OrderedDict() for _ in PRIORITIES]

    def try_now(self, adapter: str | None) -> object | None:
        """A slot without waiting, when nobody waits before this request (the uncontended path)."""
        return self._reserve(adapter) if not self.length else None

    async def wait(self, adapter: str | None, key: str, priority: int, deadline: float | None = None,
                   keepalive: Callable[[], Awaitable[None]] | None = None, keepalive_s: float = 10.0) -> object:
        """Queue until a slot is leased to this request; its Lease. A deadline (event-loop time) that passes
        first is a 429; a cancelled request (hang-up) is removed."""
        if self.length >= self.max_length:
            self._events.waited(0.0, "full")
            raise OverloadedError(f"Backend '{self.backend}' is at capacity and its queue is full; retry shortly.",
                                  self.retry_after_s)
        waiter = Waiter(adapter, key, priority, asyncio.get_running_loop().create_future())
        self._push(waiter)
        self.dispatch()
        future, loop = waiter.future, asyncio.get_running_loop()
        try:
            while not future.done():
                timeout = keepalive_s if keepalive is not None else None
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise OverloadedError(f"The request's deadline passed while it waited for a slot on backend "
                                              f"'{self.backend}'.", self.retry_after_s)
                    timeout = remaining if timeout is None else min(timeout, remaining)
                try:
                    await asyncio.wait_for(asyncio.shield(future), timeout)
                except TimeoutError:
                    if keepalive is not None and not future.done() and (deadline is None or loop.time() < deadline):
                        await keepalive()
            lease = future.result()
        except BaseException:
            if future.done() and not future.cancelled():
                future.result().release()  # a slot came just as the request gave up: hand it back
            else:
                future.cancel()
                self._remove(waiter)
            self._events.waited(time.perf_counter() - waiter.since, "expired")
            raise
        self._events.waited(time.perf_counter() - waiter.since, "admitted")
        return lease

    def dispatch(self) -> None:
        """Hand free slots to waiters in order (called when capacity frees up and when a request queues)."""
        while self.length and self._has_room():
            if not self._admit_one():
                return

    def _admit_one(self) -> bool:
        for keys in self._classes:
            for key, waiters in keys.items():
                waiter = waiters[0]
                lease = self._reserve(waiter.adapter)
                if lease is None:
                    continue  # its adapter's replicas are full: the next key may use another replica
                waiters.popleft()
                if waiters:
                    keys.move_to_end(key)  # round-robin: this key goes behind the others of its class
                else:
                    del keys[key]
                self._set_length(self.length - 1)
                waiter.future.set_result(lease)
                return True
        return False

    def _push(self, waiter: Waiter) -> None:
        keys = self._classes[waiter.priority]
        waiters = keys.get(waiter.key)
        if waiters is None:
            waiters = keys[waiter.key] = deque()
        waiters.append(waiter)
        self._set_length(self.length + 1)

    def _remove(self, waiter: Waiter) -> None:
        keys = self._classes[waiter.priority]
        waiters = keys.get(waiter.key)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del keys[waiter.key]
        self._set_length(self.length - 1)

    def _set_length(self, length: int) -> None:
        self.length = length
        self._events.length(length)

"""Balancer: which replica of a backend takes a request, and the Lease that counts it there.

A replica is eligible when it is not held (a drained restart), not ejected (backends/outliers.py), and
serves the request's adapter version (the lifecycle says which, through the driver's serve()). Among
eligible replicas that are up: least outstanding requests by power of two choices (two random candidates,
the less loaded wins), which spreads a hot adapter over every replica that has it instead of piling onto
one, at O(1) per pick. `limit` (max_concurrency) bounds a replica: `pick(free_only=True)` answers None when
every eligible replica is full, and the caller queues (gateway/policies/admission.py).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

NO_LIMIT = 1 << 30


class Lease:
    """One request counted on one replica until release() (idempotent): drains, the queue and the balancer
    read these counts."""

    __slots__ = ("replica", "adapter", "_free")

    def __init__(self, replica: int, adapter: str | None, free: Callable[[int, str | None], None]) -> None:
        self.replica, self.adapter, self._free = replica, adapter, free

    def release(self) -> None:
        free, self._free = self._free, None
        if free is not None:
            free(self.replica, self.adapter)


ANY_REPLICA = Lease(-1, None, lambda replica, adapter: None)  # no slot counted yet: send() picks the replica


class Balancer:
    __slots__ = ("busy", "limits", "up", "held", "ejected", "serving", "_random", "_count")

    def __init__(self, busy: list[int], up: list[bool], held: list[bool], ejected: list[bool],
                 serving: list[dict], limits: list[int] | None = None) -> None:
        # The driver's own per-replica lists, shared (never copied): they change under the balancer.
        self.busy, self.up, self.held, self.ejected, self.serving = busy, up, held, ejected, serving
        self.limits = limits if limits is not None else [NO_LIMIT] * len(busy)
        self._count = len(busy)
        self._random = random.Random()

    def eligible(self, adapter: str | None, avoid: Sequence[int] = ()) -> list[int]:
        """Replicas that may take `adapter` now, up ones only; empty when none is up."""
        held, ejected, up, serving = self.held, self.ejected, self.up, self.serving
        return [r for r in range(self._count)
                if up[r] and not held[r] and not ejected[r] and r not in avoid
                and (adapter is None or adapter in serving[r])]

    def pick(self, adapter: str | None, avoid: Sequence[int] = (), free_only: bool = False) -> int | None:
        """The replica for one request, or None: nothing eligible (or, with free_only, nothing with a free slot)."""
        if self._count == 1 and not avoid:  # the common single-server case, without building a list
            if self.held[0] or self.ejected[0] or not self.up[0] or (adapter is not None and adapter not in self.serving[0]):
                return None
            return 0 if not free_only or self.busy[0] < self.limits[0] else None
        candidates = self.eligible(adapter, avoid)
        if free_only:
            busy, limits = self.busy, self.limits
            candidates = [r for r in candidates if busy[r] < limits[r]]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = self._random.sample(candidates, 2)
        return first if self._load(first) <= self._load(second) else second

    def _load(self, replica: int) -> float:
        limit = self.limits[replica]
        return self.busy[replica] if limit == NO_LIMIT else self.busy[replica] / limit

    def has_room(self) -> bool:
        """Some replica that is up has a free slot (the queue scans its waiters only then)."""
        busy, limits, up, held, ejected = self.busy, self.limits, self.up, self.held, self.ejected
        return any(busy[r] < limits[r] and up[r] and not held[r] and not ejected[r] for r in range(self._count))

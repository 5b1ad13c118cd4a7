"""AffinityPlan: which replicas of one backend hold which adapter versions, when not every version fits on
every replica (a backend that loads at run time with `max_loaded_adapters`, SGLang's --max-loaded-loras).

Every version gets one home; the slots left over go to versions by demand (their request rate, a moving
average), so a hot adapter is spread over more replicas and the balancer spreads its requests among them
(backends/balancer.py), instead of one replica thrashing. Homes are sticky: a version moves only when its
share of demand asks for another copy, at most `max_moves` new copies per update (so loads per minute stay
bounded under any mix), and a copy is evicted only to make room for a copy another version needs more.
New homes are chosen by rendezvous hashing, so plans are stable and reproducible. The lifecycle does the
loads and unloads (adapters/lifecycle.py); this class is pure bookkeeping.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence


def rendezvous(label: str, replica: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{label}\x00{replica}".encode(), digest_size=8).digest(), "big")


class AffinityPlan:
    def __init__(self, replicas: int, capacity: int, *, max_moves: int = 2, min_interval_s: float = 1.0) -> None:
        self.count = replicas
        self.capacity = capacity
        self.max_moves = max_moves
        self.min_interval_s = min_interval_s
        self.homes: dict[str, set[int]] = {}
        self.demand: dict[str, float] = {}      # requests per second, moving average
        self._seen: dict[str, int] = {}          # the driver's request count at the last update
        self._updated_at: float | None = None

    def holds(self, replica: int) -> set[str]:
        return {label for label, homes in self.homes.items() if replica in homes}

    def update(self, labels: Sequence[str], requests: Mapping[str, int], up: Sequence[bool], now: float) -> None:
        """Take the request counts since the last update, then give every version its homes."""
        self._note_demand(labels, requests, now)
        for label in [label for label in self.homes if label not in labels]:
            del self.homes[label]
        want = self.copies(labels, up)
        moves = 0
        for label in sorted(labels, key=lambda name: (-self.demand.get(name, 0.0), name)):
            homes = self.homes.setdefault(label, set())
            while True:
                live = sum(1 for r in homes if up[r])
                if live >= want[label] or (live and moves >= self.max_moves):
                    break
                replica = self._room_for(label, want, up)
                if replica is None:
                    break
                homes.add(replica)
                moves += 1

    def place_new(self, label: str, up: Sequence[bool], inherit: str | None = None) -> set[int]:
        """Homes for a version being brought in: its predecessor's (a swap), else one replica with room."""
        if inherit is not None and self.homes.get(inherit):
            self.homes[label] = set(self.homes[inherit])
        elif label not in self.homes:
            want = self.copies(list(self.homes), up)
            replica = self._room_for(label, want, up)
            self.homes[label] = {replica} if replica is not None else set()
        return self.homes[label]

    def copies(self, labels: Sequence[str], up: Sequence[bool]) -> dict[str, int]:
        """How many replicas each version should be on: one each, and the spare slots by share of demand."""
        live = sum(1 for u in up if u) or self.count
        spare = max(0, live * self.capacity - len(labels))
        total = sum(self.demand.get(label, 0.0) for label in labels)
        want = {}
        for label in labels:
            share = self.demand.get(label, 0.0) / total if total > 0 else 0.0
            want[label] = min(live, 1 + math.floor(spare * share))
        return want

    def _note_demand(self, labels: Sequence[str], requests: Mapping[str, int], now: float) -> None:
        elapsed = None if self._updated_at is None else now - self._updated_at
        if elapsed is not None and elapsed < self.min_interval_s:
            return
        for label in labels:
            count = requests.get(label, 0)
            new = count - self._seen.get(label, count)
            self._seen[label] = count
            if elapsed:
                self.demand[label] = 0.5 * self.demand.get(label, 0.0) + 0.5 * new / elapsed
        self._updated_at = now

    def _room_for(self, label: str, want: Mapping[str, int], up: Sequence[bool]) -> int | None:
        """A replica that is up and does not hold `label`, with a free slot (or one freed by evicting a copy of
        a version that has more than it needs); the rendezvous order among equals."""
        free, evictable = [], []
        for replica in range(self.count):
            if not up[replica] or replica in self.homes.get(label, ()):
                continue
            held = self.holds(replica)
            if len(held) < self.capacity:
                free.append(replica)
            elif self._surplus(held, want, up):
                evictable.append(replica)
        choice = max(free or evictable, key=lambda r: rendezvous(label, r), default=None)
        if choice is not None and choice not in free:
            victim = self._surplus(self.holds(choice), want, up)
            self.homes[victim].discard(choice)
        if choice is None:
            choice = self._shift_for(label, up)
        return choice

    def _shift_for(self, label: str, up: Sequence[bool]) -> int | None:
        """Free a slot on a full replica by moving one of its versions to a replica with a free slot (the
        spare slots are elsewhere, on replicas that already hold `label`)."""
        for replica in sorted(range(self.count), key=lambda r: -rendezvous(label, r)):
            if not up[replica] or replica in self.homes.get(label, ()):
                continue
            for version in sorted(self.holds(replica), key=lambda v: self.demand.get(v, 0.0)):
                spare = [r for r in range(self.count) if up[r] and r not in self.homes[version]
                         and len(self.holds(r)) < self.capacity]
                if spare:
                    self.homes[version].discard(replica)
                    self.homes[version].add(max(spare, key=lambda r: rendezvous(version, r)))
                    return replica
        return None

    def _surplus(self, held: set[str], want: Mapping[str, int], up: Sequence[bool]) -> str | None:
        """The version on this replica with the most copies beyond what it needs (least demand first)."""
        over = [(sum(1 for r in self.homes[v] if up[r]) - want.get(v, 1), -self.demand.get(v, 0.0), v)
                for v in held if v in self.homes]
        over = [entry for entry in over if entry[0] > 0 and len(self.homes[entry[2]]) > 1]
        return max(over)[2] if over else None

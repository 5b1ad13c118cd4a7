"""Split: weighted variants over 10,000 hash buckets, sticky on a key.

Each key hashes (with the experiment's name, so experiments split independently) to one bucket; variants own
contiguous bucket ranges in their listed order. Changing weights moves only the buckets whose owner changed:
90/10 -> 80/20 moves the 1,000 buckets in [8000, 9000), 10% of users, and nobody else.
"""
from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from typing import Mapping

BUCKETS = 10_000


def bucket_of(experiment: str, key: str) -> int:
    digest = hashlib.blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class Split:
    """Bucket ranges for one set of weights; immutable, built when the route table is built."""

    __slots__ = ("experiment", "names", "ends")

    def __init__(self, experiment: str, weights: Mapping[str, float]) -> None:
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("weights must sum to more than 0")
        self.experiment = experiment
        names, ends, cumulative = [], [], 0.0
        for name, weight in weights.items():
            if weight <= 0:
                continue
            cumulative += weight
            names.append(name)
            ends.append(round(cumulative / total * BUCKETS))   # exclusive end of this variant's range
        ends[-1] = BUCKETS
        self.names, self.ends = tuple(names), tuple(ends)

    def pick(self, key: str | None) -> str:
        """The variant for `key`; without a key (nothing to be sticky on), a random one by weight."""
        bucket = bucket_of(self.experiment, key) if key else random.randrange(BUCKETS)
        return self.names[bisect_right(self.ends, bucket)]

    def share(self, name: str) -> float:
        """The fraction of buckets `name` owns."""
        if name not in self.names:
            return 0.0
        index = self.names.index(name)
        return (self.ends[index] - (self.ends[index - 1] if index else 0)) / BUCKETS

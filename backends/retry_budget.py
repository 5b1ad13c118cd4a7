"""RetryBudget: retries as a share of a backend's traffic, so that retries cannot amplify an outage.

Every request counts; a retry is allowed while the retries of the last `window_s` stay under
`ratio` x the requests of that window plus a floor of `min_per_s` per second (the floor keeps a quiet
backend retryable). When a backend fails for everyone, at most `ratio` extra requests per request reach
it, instead of `attempts` x. A request costs one integer increment (`budget.requests += 1`); the requests
are put into one-second buckets only when a retry is asked for, spread evenly over the time since the last
look (so an hour of quiet traffic does not fund a burst of retries).
"""
from __future__ import annotations

import math
import time
from typing import Callable


class RetryBudget:
    __slots__ = ("ratio", "floor", "requests", "_buckets", "_second", "_clock", "_counted", "_looked_at")

    def __init__(self, ratio: float = 0.2, min_per_s: float = 5.0, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        size = max(1, math.ceil(window_s))
        self.floor = min_per_s * size
        self._buckets = [[0, 0] for _ in range(size)]   # per second of the window: [requests, retries]
        self._second = -1
        self._clock = clock
        self.requests = 0       # callers count a request inline (`budget.requests += 1`): no call, no clock
        self._counted = 0       # requests already put into a bucket
        self._looked_at: float | None = None

    def _bucket(self) -> list[int]:
        now = self._clock()
        second = int(now)
        buckets = self._buckets
        if second != self._second:
            gap = second - self._second if self._second >= 0 else len(buckets)
            for step in range(1, min(gap, len(buckets)) + 1):  # clear the seconds that went by
                bucket = buckets[(self._second + step) % len(buckets)]
                bucket[0] = bucket[1] = 0
            self._second = second
        bucket = buckets[second % len(buckets)]
        new, elapsed = self.requests - self._counted, now - self._looked_at if self._looked_at is not None else 0.0
        if elapsed > len(buckets):  # only the share of them that falls inside the window counts
            new = int(new * len(buckets) / elapsed)
        bucket[0] += new
        self._counted, self._looked_at = self.requests, now
        return bucket

    def request(self) -> None:
        self.requests += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when the window has none left."""
        bucket = self._bucket()
        requests = sum(b[0] for b in self._buckets)
        retries = sum(b[1] for b in self._buckets)
        if retries >= self.floor + self.ratio * requests:
            return False
        bucket[1] += 1
        return True

"""RetryBudget: retries as a share of a backend's traffic, so that retries cannot amplify an outage.

Every request counts; a retry is allowed while the retries of the last `window_s` stay under
`ratio` x the requests of that window plus a floor of `min_per_s` per second (the floor keeps a quiet
backend retryable). When a backend fails for everyone, at most `ratio` extra requests per request reach
it, instead of `attempts` x. Counted in one-second buckets: two integer updates per request.
"""
from __future__ import annotations

import math
import time
from typing import Callable


class RetryBudget:
    __slots__ = ("ratio", "floor", "_buckets", "_second", "_clock", "_current", "_next_at")

    def __init__(self, ratio: float = 0.2, min_per_s: float = 5.0, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        size = max(1, math.ceil(window_s))
        self.floor = min_per_s * size
        self._buckets = [[0, 0] for _ in range(size)]   # per second of the window: [requests, retries]
        self._second = -1
        self._clock = clock
        self._current = self._buckets[0]
        self._next_at = -1.0    # when the current second ends: request() reads the clock and compares, no more

    def _bucket(self) -> list[int]:
        second = int(self._clock())
        buckets = self._buckets
        if second != self._second:
            gap = second - self._second if self._second >= 0 else len(buckets)
            for step in range(1, min(gap, len(buckets)) + 1):  # clear the seconds that went by
                bucket = buckets[(self._second + step) % len(buckets)]
                bucket[0] = bucket[1] = 0
            self._second = second
            self._current = buckets[second % len(buckets)]
            self._next_at = second + 1
        return self._current

    def request(self) -> None:
        if self._clock() >= self._next_at:
            self._bucket()
        self._current[0] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when the window has none left."""
        bucket = self._bucket()
        requests = sum(b[0] for b in self._buckets)
        retries = sum(b[1] for b in self._buckets)
        if retries >= self.floor + self.ratio * requests:
            return False
        bucket[1] += 1
        return True

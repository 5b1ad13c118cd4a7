"""OutlierDetector: passive health per replica. Failures the data plane sees (connect errors, 5xx, resets
before the first byte) eject a replica after `consecutive_failures` in a row or a `failure_ratio` over a
window; an ejected replica gets no requests until a probe of its health endpoint passes (half-open), first
after `ejection_s`, then doubling per ejection up to `max_ejection_s`. Ejection is capped: never more than
`max_ejected_percent` of the replicas, and never the last one, so one bad minute cannot empty a fleet.

The driver owns the probe task; this class is pure bookkeeping, so it is tested with a fake clock.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from backends.config import OutlierConfig

log = logging.getLogger(__name__)


class OutlierDetector:
    def __init__(self, replicas: tuple[str, ...], config: OutlierConfig, *, backend: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        count = len(replicas)
        self.replicas = replicas
        self.backend = backend
        self.config = config
        self.ejected = [False] * count          # read by the balancer on every pick
        self.ejections = 0                      # total, for metrics
        self.on_change: Callable[[int, bool], None] | None = None   # (replica, ejected): metrics, the queue
        self._clock = clock
        # Per replica: failures in a row, and successes so far. The driver records a success inline on the
        # hot path (`in_a_row[r] = 0; ok[r] += 1`, what success() does) rather than through a call.
        self.in_a_row = [0] * count
        self.ok = [0] * count
        self._window = [[0.0, 0, 0] for _ in range(count)]   # [start, successes before it, failures since]
        self._times = [0] * count               # ejections of each replica so far: the backoff
        self._probe_at = [0.0] * count

    def success(self, replica: int) -> None:
        self.in_a_row[replica] = 0
        self.ok[replica] += 1

    def failure(self, replica: int) -> bool:
        """Count a failure; True when it ejected the replica."""
        self.in_a_row[replica] += 1
        requests, failures = self._count_failure(replica)
        config = self.config
        if self.ejected[replica]:
            return False
        if self.in_a_row[replica] >= config.consecutive_failures or (
                requests >= config.min_requests and failures >= config.failure_ratio * requests):
            return self.eject(replica)
        return False

    def _count_failure(self, replica: int) -> tuple[int, int]:
        """(requests, failures) in the current window, this failure included; a window starts at a failure
        that comes after the last one ended, so successes cost no clock reading."""
        window, now = self._window[replica], self._clock()
        if now - window[0] > self.config.ratio_window_s:
            window[0], window[1], window[2] = now, self.ok[replica], 0
        window[2] += 1
        return self.ok[replica] - window[1] + window[2], window[2]

    def may_eject(self) -> bool:
        count = len(self.ejected)
        ejected = sum(self.ejected)
        return ejected + 1 < count and (ejected + 1) * 100 <= self.config.max_ejected_percent * count

    def eject(self, replica: int) -> bool:
        if self.ejected[replica] or not self.may_eject():
            return False
        config = self.config
        self.ejected[replica] = True
        self.ejections += 1
        delay = min(config.max_ejection_s, config.ejection_s * 2 ** self._times[replica])
        self._times[replica] += 1
        self._probe_at[replica] = self._clock() + delay
        log.warning("%s replica %s ejected after %d failure(s) in a row; first probe in %.1f s", self.backend,
                    self.replicas[replica], self.in_a_row[replica], delay)
        if self.on_change is not None:
            self.on_change(replica, True)
        return True

    def due(self) -> list[int]:
        """Ejected replicas whose next probe is due."""
        now = self._clock()
        return [r for r, out in enumerate(self.ejected) if out and self._probe_at[r] <= now]

    def next_probe_in(self) -> float | None:
        waits = [self._probe_at[r] - self._clock() for r, out in enumerate(self.ejected) if out]
        return max(0.0, min(waits)) if waits else None

    def probed(self, replica: int, healthy: bool) -> None:
        """A half-open probe's outcome: readmit, or probe again later (the same backoff step)."""
        if not self.ejected[replica]:
            return
        if not healthy:
            step = max(0, self._times[replica] - 1)
            self._probe_at[replica] = self._clock() + min(self.config.max_ejection_s,
                                                          self.config.ejection_s * 2 ** step)
            return
        self.ejected[replica] = False
        self.in_a_row[replica] = 0
        self._window[replica] = [self._clock(), self.ok[replica], 0]
        log.warning("%s replica %s readmitted: its health probe passed", self.backend, self.replicas[replica])
        if self.on_change is not None:
            self.on_change(replica, False)

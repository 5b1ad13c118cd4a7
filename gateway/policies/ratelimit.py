"""Per-key request and token budgets (rpm, tpm) as token buckets: refused with 429 and `retry-after`.

Tokens are charged up front as the hosted API does (prompt estimate + max_tokens), so a burst of long
requests is refused before it reaches a backend. Buckets live in this process: each replica counts alone
(gateway/policies/ratelimit_redis.py shares them across a fleet, and falls back to this one with `share`).
"""
from __future__ import annotations

import time
from typing import Callable

from gateway.auth import Principal
from gateway.errors import RateLimitedError

DEFAULT_COMPLETION_CHARGE = 1024   # tokens charged when a request names no max_tokens
BYTES_PER_TOKEN = 4                # a rough prompt estimate from the body size, without a tokenizer


class Bucket:
    __slots__ = ("capacity", "level", "stamp")

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.stamp = time.monotonic()

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` fits (0 = it fits now); refills at capacity per minute."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now
        amount = min(amount, self.capacity)   # a request larger than the budget waits for a full bucket
        return 0.0 if self.level >= amount else (amount - self.level) * 60.0 / self.capacity

    def take(self, amount: float) -> None:
        self.level -= min(amount, self.capacity)


class RateLimiter:
    """`share()`: how many replicas split each limit (this one enforces limit / share); 1 when alone."""

    def __init__(self, share: Callable[[], int] | None = None) -> None:
        self._buckets: dict[tuple[str, str, int], Bucket] = {}
        self._share = share

    def _bucket(self, principal: Principal, kind: str, per_minute: int) -> Bucket:
        if self._share is not None:
            per_minute = max(1, per_minute // max(1, self._share()))
        key = (principal.name, kind, per_minute)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(per_minute)
        return bucket

    async def admit(self, principal: Principal, body_bytes: int, max_tokens: int | None) -> None:
        if principal.rpm is None and principal.tpm is None:
            return
        tokens = body_bytes // BYTES_PER_TOKEN + (max_tokens or DEFAULT_COMPLETION_CHARGE)
        requests = self._bucket(principal, "requests", principal.rpm) if principal.rpm else None
        budget = self._bucket(principal, "tokens", principal.tpm) if principal.tpm else None
        if requests is not None and (wait := requests.wait_for(1)) > 0:
            raise RateLimitedError("requests", wait)
        if budget is not None and (wait := budget.wait_for(tokens)) > 0:
            raise RateLimitedError("tokens", wait)
        if requests is not None:
            requests.take(1)
        if budget is not None:
            budget.take(tokens)

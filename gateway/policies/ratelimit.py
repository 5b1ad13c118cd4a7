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

    def wait_for(self, amount: float, now: float | None = None) -> float:
        """Seconds until `amount` fits (0 = it fits now); refills at capacity per minute."""
        if now is None:
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
        # id(principal) -> (principal, its requests bucket, its tokens bucket), when no share can change them
        self._pairs: dict[int, tuple[Principal, Bucket | None, Bucket | None]] = {}

    def _bucket(self, principal: Principal, kind: str, per_minute: int) -> Bucket:
        if self._share is not None:
            per_minute = max(1, per_minute // max(1, self._share()))
        key = (principal.name, kind, per_minute)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(per_minute)
        return bucket

    def _buckets_of(self, principal: Principal) -> tuple[Principal, Bucket | None, Bucket | None]:
        requests = self._bucket(principal, "requests", principal.rpm) if principal.rpm else None
        budget = self._bucket(principal, "tokens", principal.tpm) if principal.tpm else None
        entry = (principal, requests, budget)
        if self._share is None:   # fixed limits: the same buckets for this key until the config changes
            if len(self._pairs) >= 4096:   # keys reloaded many times: principals that may be gone
                self._pairs.clear()
            self._pairs[id(principal)] = entry
        return entry

    async def admit(self, principal: Principal, body_bytes: int, max_tokens: int | None) -> None:
        self.check(principal, body_bytes, max_tokens)

    def check(self, principal: Principal, body_bytes: int, max_tokens: int | None) -> None:
        """admit() without a coroutine: the data plane calls this one directly when the buckets are local."""
        if principal.rpm is None and principal.tpm is None:
            return
        entry = self._pairs.get(id(principal))
        if entry is None or entry[0] is not principal:
            entry = self._buckets_of(principal)
        _, requests, budget = entry
        now = time.monotonic()
        if requests is not None and (wait := requests.wait_for(1, now)) > 0:
            raise RateLimitedError("requests", wait)
        if budget is not None:
            tokens = body_bytes // BYTES_PER_TOKEN + (max_tokens or DEFAULT_COMPLETION_CHARGE)
            if (wait := budget.wait_for(tokens, now)) > 0:
                raise RateLimitedError("tokens", wait)
            budget.take(tokens)
        if requests is not None:   # taken only once both fit
            requests.take(1)

"""Shared: what the replicas of a fleet share in Redis (config `shared: {kind: redis}`), rate limits and reasoning
memory, and how a replica serves on when Redis does not answer.

`RedisLink` owns the client. One failed or slow call (past `shared.timeout_s`) marks Redis down for
RETRY_S: until then every request goes straight to the local fallback (no per-request timeout while it is
down), counted in `kimi_gateway_shared_degraded_total{what}` and logged once per outage. A heartbeat tells the
link how many replicas are alive, so that the rate limiter's fallback is each replica's share of the limit.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError
from redis.retry import Retry

from gateway.config import ConfigError, GatewayConfig, resolve_secret
from gateway.metrics import FleetRecorder
from gateway.policies.ratelimit import RateLimiter
from gateway.policies.ratelimit_redis import RedisRateLimiter
from gateway.policies.reasoning_memory import ReasoningMemory
from gateway.policies.reasoning_memory_redis import SharedReasoningMemory

log = logging.getLogger(__name__)
RETRY_S = 1.0          # after a failure, how long requests skip Redis before one tries again
HEARTBEAT_S = 5.0
REPLICA_TTL_S = 3 * HEARTBEAT_S
FAILURES = (RedisError, OSError, asyncio.TimeoutError)


class RedisLink:
    def __init__(self, url: str, *, prefix: str, timeout_s: float, replicas: int, events: FleetRecorder) -> None:
        # One retry, on a fresh connection, for a pooled one that Redis closed (a restart); never for a timeout.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
                                           health_check_interval=0)
        self.prefix = prefix
        self.replicas = replicas                 # alive replicas, as the heartbeat last saw them
        self.events = events
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._down_until = 0.0
        self._down_since: float | None = None
        self._task: asyncio.Task | None = None

    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, what: str, exc: BaseException | None) -> None:
        """A request served without Redis: counted; the outage logged once, when it starts."""
        self.events.shared_degraded(what)
        if exc is not None:
            self.down(exc)

    def down(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + RETRY_S
        if self._down_since is None:
            self._down_since = now
            log.warning("Redis unreachable (%s: %s): rate limits fall back to this replica's share (1/%d), "
                        "reasoning memory to this replica's", type(exc).__name__, exc, self.replicas)

    def succeeded(self) -> None:
        if self._down_since is not None:
            log.warning("Redis is back after %.1f s: shared rate limits and memory again",
                        time.monotonic() - self._down_since)
            self._down_since = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._heartbeat(), name="redis-heartbeat")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()

    async def _heartbeat(self) -> None:
        key = f"{self.prefix}:replicas"
        while True:
            now = time.time()
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.zadd(key, {self.replica_id: now})
                    pipe.zremrangebyscore(key, "-inf", now - REPLICA_TTL_S)
                    pipe.zcard(key)
                    pipe.expire(key, int(REPLICA_TTL_S * 2))
                    *_, count, _ = await pipe.execute()
                self.replicas = max(1, int(count))
                self.succeeded()
            except FAILURES as exc:
                self.down(exc)
            await asyncio.sleep(HEARTBEAT_S)


class Shared:
    """The rate limiter and reasoning memory this replica uses, and the link they share (None: local)."""

    def __init__(self, limiter, memory: ReasoningMemory | None, link: RedisLink | None) -> None:
        self.limiter, self.memory, self.link = limiter, memory, link

    async def start(self) -> None:
        if self.link is not None:
            await self.link.start()

    async def aclose(self) -> None:
        if self.link is not None:
            await self.link.aclose()


def build_shared(config: GatewayConfig, events: FleetRecorder) -> Shared:
    memory_config, shared = config.reasoning_memory, config.shared
    limits = dict(max_entries=memory_config.max_entries, max_bytes=memory_config.max_bytes, ttl_s=memory_config.ttl_s)
    if shared.kind == "local":
        return Shared(RateLimiter(), ReasoningMemory(**limits) if memory_config.enabled else None, None)
    url = resolve_secret(shared.url_env)
    if url is None:
        raise ConfigError(f"shared.url_env: the environment variable {shared.url_env} (the Redis URL) is not set")
    link = RedisLink(url, prefix=shared.key_prefix, timeout_s=shared.timeout_s, replicas=shared.replicas,
                     events=events)
    memory = SharedReasoningMemory(link, tenant_max_bytes=memory_config.tenant_max_bytes, **limits) \
        if memory_config.enabled else None
    return Shared(RedisRateLimiter(link), memory, link)

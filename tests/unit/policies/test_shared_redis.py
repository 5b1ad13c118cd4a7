"""The Redis-backed rate limiter and reasoning memory, against the machine's real Redis: one budget and one
memory for several replicas, the per-tenant byte bound, and the degraded fallback when Redis is away."""
import asyncio

import pytest

from gateway.auth import Principal
from gateway.errors import RateLimitedError
from gateway.metrics import FleetRecorder, Metrics
from gateway.policies.ratelimit_redis import RedisRateLimiter
from gateway.policies.reasoning_memory_redis import SharedReasoningMemory
from gateway.shared import RedisLink
from tests.services import REDIS_URL, drop_prefix, fresh_prefix

CALLS = [{"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]


@pytest.fixture
async def links():
    """Two replicas' links to one Redis under a fresh prefix."""
    prefix = fresh_prefix()
    made = [RedisLink(REDIS_URL, prefix=prefix, timeout_s=2.0, replicas=2, events=FleetRecorder(Metrics())) for _ in range(2)]
    yield made
    for link in made:
        await link.aclose()
    drop_prefix(prefix)


def degraded(link: RedisLink, what: str) -> float:
    return link.events._metrics.shared_degraded.labels(what)._value.get()


async def test_replicas_share_one_rpm_budget(links):
    limiters = [RedisRateLimiter(link) for link in links]
    key = Principal("team", ("*",), rpm=3)
    for index in range(3):
        await limiters[index % 2].admit(key, 100, 10)
    for limiter in limiters:
        with pytest.raises(RateLimitedError) as refused:
            await limiter.admit(key, 100, 10)
        assert refused.value.headers["retry-after"] == "20"   # one request refills in 60/3 s
    await limiters[0].admit(Principal("other", ("*",), rpm=3), 100, 10)   # budgets are per key
    assert degraded(links[0], "ratelimit") == 0


async def test_tokens_are_charged_once_across_replicas(links):
    limiters = [RedisRateLimiter(link) for link in links]
    key = Principal("team", ("*",), rpm=100, tpm=1000)
    await limiters[0].admit(key, 400, 800)                  # 100 + 800
    with pytest.raises(RateLimitedError, match="tokens per minute"):
        await limiters[1].admit(key, 400, 200)
    await limiters[1].admit(key, 0, 90)                     # what is left still fits; a refusal took nothing


async def test_redis_away_means_each_replica_enforces_its_share():
    link = RedisLink("redis://127.0.0.1:1/0", prefix=fresh_prefix(), timeout_s=0.5, replicas=3, events=FleetRecorder(Metrics()))
    try:
        limiter = RedisRateLimiter(link)
        key = Principal("team", ("*",), rpm=6)
        await limiter.admit(key, 100, 10)
        await limiter.admit(key, 100, 10)
        with pytest.raises(RateLimitedError):
            await limiter.admit(key, 100, 10)               # 6 rpm over 3 replicas: 2 here
        assert degraded(link, "ratelimit") == 3 and not link.usable()
    finally:
        await link.aclose()


def memory(link: RedisLink, **limits) -> SharedReasoningMemory:
    return SharedReasoningMemory(link, **{"tenant_max_bytes": 100_000, "max_entries": 100, "max_bytes": 1_000_000,
                                          "ttl_s": 60, **limits})


async def settle(memory: SharedReasoningMemory) -> None:
    await asyncio.gather(*memory._pending)


async def test_a_turn_remembered_on_one_replica_is_restored_on_another(links):
    first, second = memory(links[0]), memory(links[1])
    assert first.remember("key:team", CALLS, "I should call get_weather.")
    await settle(first)
    history = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": CALLS}]
    await second.prefetch("key:other", history)                       # another tenant finds nothing
    assert second.restore("key:other", history) == (0, 1)
    await second.prefetch("key:team", history)
    assert second.restore("key:team", history) == (1, 0)
    assert history[1]["reasoning_content"] == "I should call get_weather."


async def test_each_tenant_is_bounded_in_bytes_oldest_first(links):
    first, second = memory(links[0], tenant_max_bytes=2048), memory(links[1])
    calls = [[{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}] for i in range(3)]
    for turn in calls:
        first.remember("key:team", turn, "x" * 900)
        await settle(first)
    found = []
    for turn in calls:
        history = [{"role": "assistant", "content": None, "tool_calls": turn}]
        await second.prefetch("key:team", history)
        found.append(second.restore("key:team", history)[0])
    assert found == [0, 1, 1]


async def test_redis_away_keeps_memory_local_and_counts_it():
    link = RedisLink("redis://127.0.0.1:1/0", prefix=fresh_prefix(), timeout_s=0.5, replicas=1, events=FleetRecorder(Metrics()))
    try:
        local = memory(link)
        local.remember("key:team", CALLS, "thinking")
        await settle(local)
        history = [{"role": "assistant", "content": None, "tool_calls": CALLS}]
        await local.prefetch("key:team", history)   # found locally: Redis is not even asked
        assert local.restore("key:team", history) == (1, 0)
        assert degraded(link, "memory") == 1
    finally:
        await link.aclose()

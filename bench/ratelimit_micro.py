"""What the Redis rate limiter (config `shared: {kind: redis}`) adds to each request, against the in-process
one: the admit step alone, in process, over the real Redis on loopback.

    python bench/ratelimit_micro.py [--requests 20000] [--redis redis://127.0.0.1:6379/0]

Reported per admitted request: CPU time of this process (what the gateway's one core pays: Lua call, encoding,
the asyncio client) and wall time one at a time (the latency a request waits, Redis round trip included), p50
and p99; and CPU per request with 64 requests in flight (pipelined on a pool, as under load). Redis runs the
script on its own core; its CPU is not counted here. The key's budget is large enough that nothing is refused.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import redis

import checkout
checkout.use()  # this checkout's packages, not the venv's installed ones
from gateway.auth import Principal
from gateway.metrics import FleetRecorder, Metrics
from gateway.policies.ratelimit import RateLimiter
from gateway.policies.ratelimit_redis import RedisRateLimiter
from gateway.shared import RedisLink

KEY = Principal("bench", ("*",), rpm=10**9, tpm=10**12)


async def sequential(limiter, count: int) -> tuple[float, list[float]]:
    walls = []
    cpu = time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        await limiter.admit(KEY, 600, 256)
        walls.append(time.perf_counter() - started)
    return (time.process_time() - cpu) / count, walls


async def concurrent(limiter, count: int, in_flight: int = 64) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await limiter.admit(KEY, 600, 256)
    cpu = time.process_time()
    await asyncio.gather(*(worker(count // in_flight) for _ in range(in_flight)))
    return (time.process_time() - cpu) / (count // in_flight * in_flight)


def line(name: str, cpu: float, walls: list[float], cpu_busy: float) -> str:
    walls = sorted(walls)
    p50, p99 = statistics.median(walls), walls[int(len(walls) * 0.99)]
    return (f"| {name} | {cpu * 1e6:.1f} | {p50 * 1e6:.1f} | {p99 * 1e6:.1f} | {cpu_busy * 1e6:.1f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    prefix = f"kgw-bench-{uuid.uuid4().hex[:8]}"
    link = RedisLink(args.redis, prefix=prefix, timeout_s=1.0, replicas=1, events=FleetRecorder(Metrics()))
    rows = []
    try:
        for name, limiter in (("in process", RateLimiter()), ("redis", RedisRateLimiter(link))):
            await sequential(limiter, 500)   # warm: connections, the script cached by Redis
            cpu, walls = await sequential(limiter, args.requests)
            busy = await concurrent(limiter, args.requests)
            rows.append(line(name, cpu, walls, busy))
        assert link.events._metrics.shared_degraded.labels("ratelimit")._value.get() == 0, "Redis failed during the run"
    finally:
        await link.aclose()
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    print(f"{args.requests} admitted requests each (rpm and tpm buckets), µs per request:\n")
    print("| limiter | CPU, one at a time | wall p50 | wall p99 | CPU, 64 in flight |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())

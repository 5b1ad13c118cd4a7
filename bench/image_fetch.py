"""What an http(s) image URL costs in fetch mode, on loopback: ImagePolicy.apply (parse, address check, pinned
connect, read, base64) per image, against a bare httpx GET of the same bytes on a fresh connection.

    PYTHONPATH=. python bench/image_fetch.py [--requests 500] [--kib 64]

The image host is a minimal asyncio server in this process on 127.0.0.3 (trusted for the run), so the
numbers are the gateway's own work plus one loopback TCP connection per image. Requests without image
parts never reach this code (bench/dataplane_micro.py measures those).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from gateway.config import LimitsConfig
from gateway.policies.content import ImagePolicy

HOST = "127.0.0.3"
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


async def serve(body: bytes) -> asyncio.Server:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body)) + body

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(reply)
            await writer.drain()
            if reader.at_eof():
                break

    async def guarded(reader, writer) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(guarded, HOST, 0)


def doc(*urls: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]}


async def timed(step, requests: int) -> tuple[float, float]:
    """(median wall µs, mean CPU µs of this process, image server included) of `step()` over `requests` runs.
    CPU time is the steadier number on a shared machine."""
    for _ in range(20):
        await step()
    samples = []
    cpu = time.process_time()
    for _ in range(requests):
        start = time.perf_counter()
        await step()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples), (time.process_time() - cpu) / requests * 1e6


async def run(requests: int, kib: int) -> None:
    server = await serve(PNG_HEAD + b"\0" * (kib * 1024 - len(PNG_HEAD)))
    port = server.sockets[0].getsockname()[1]
    url = f"http://{HOST}:{port}/image.png"
    policy = ImagePolicy(LimitsConfig(private_image_networks=(f"{HOST}/32",)))

    async def gateway_fetch(count: int = 1) -> None:
        await policy.apply(doc(*(f"{url}?{i}" for i in range(count))), "fetch")

    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient() as pooled, httpx.AsyncClient(limits=no_keepalive) as fresh:
        async def bare_pooled() -> None:
            (await pooled.get(url)).raise_for_status()

        async def bare_fresh() -> None:
            (await fresh.get(url)).raise_for_status()
        results = {
            "bare httpx GET, kept-alive connection": await timed(bare_pooled, requests),
            "bare httpx GET, new connection each time": await timed(bare_fresh, requests),
            "gateway fetch mode, 1 image": await timed(gateway_fetch, requests),
            "gateway fetch mode, 4 images (concurrent)": await timed(lambda: gateway_fetch(4), requests // 4),
        }
    server.close()
    await server.wait_closed()
    print(f"image of {kib} KiB on loopback, per request:          median wall    mean CPU")
    for name, (wall, cpu) in results.items():
        print(f"  {name:45s} {wall:8.0f} µs {cpu:8.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--kib", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.kib))


if __name__ == "__main__":
    main()

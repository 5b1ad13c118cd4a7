"""The benchmark's own load generator: a lean keep-alive HTTP/1.1 client (asyncio.Protocol + httptools, uvloop).

    python bench/loadgen.py rate   --url URL --body JSON --rate 200 --duration 10 [--warmup 2]
    python bench/loadgen.py closed --url URL --body JSON --connections 32 --requests 100000 [--max-seconds 120]
    python bench/loadgen.py stream --url URL --body JSON --streams 100 --duration 8 [--warmup 1]
    python bench/loadgen.py ttft   --url URL --body JSON --count 300 [--max-seconds 30]
    python bench/loadgen.py hold   --url URL --body JSON --streams 1000 [--hold-seconds 60]

Each mode prints one JSON object on stdout (`hold` prints one when every stream has its first event, then keeps
them open until killed or `--hold-seconds` pass). Every loop is bounded in count and in time.

Why not hey or wrk for the fixed-rate figure: hey reports latencies with 0.1 ms resolution and its `-q` rate is
a per-worker throttle (each worker waits for its reply: closed loop); wrk2 is not packaged in Debian. `rate`
is open loop: request i is sent at t0 + i/rate whatever happened to earlier ones, on a pool of keep-alive
connections (a new one when all are busy, up to --max-connections, then the request counts as dropped).
Latency runs from the write of the request to the end of the response, read with time.perf_counter().
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from urllib.parse import urlsplit

import httptools

IDLE_DISCARD_S = 4.0  # uvicorn closes keep-alive connections idle 5 s: never reuse one that old


def build_request(url: str, body: bytes, headers: list[str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: keep-alive", *headers]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


class Stats:
    def __init__(self) -> None:
        self.events = 0          # SSE `data:` events received, all connections
        self.ok = 0
        self.errors = 0
        self.status: dict[int, int] = {}


class Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; calls `done(conn, ok)` when the response ends."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.dead = False
        self.busy = False
        self.done = None
        self.count_events = False
        self.t_send = self.t_first = self.t_end = 0.0
        self.last_used = time.perf_counter()
        self.events = 0
        self.status = 0
        self._tail = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes, done, count_events: bool = False) -> None:
        self.busy, self.done, self.count_events = True, done, count_events
        self.events, self.status, self.t_first, self._tail = 0, 0, 0.0, b""
        self.t_send = time.perf_counter()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(False)
            self.abort()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.count_events:
            data = self._tail + body
            found = data.count(b"data:")
            if found:
                if not self.t_first:
                    self.t_first = time.perf_counter()
                self.events += found
                self.stats.events += found
            self._tail = data[-4:]  # shorter than "data:": nothing is counted twice

    def on_message_complete(self) -> None:
        self.t_end = time.perf_counter()
        self._finish(self.status == 200)
        if not self.parser.should_keep_alive():
            self.abort()

    def _finish(self, ok: bool) -> None:
        if not self.busy:
            return
        self.busy = False
        self.last_used = time.perf_counter()
        stats = self.stats
        stats.status[self.status] = stats.status.get(self.status, 0) + 1
        if ok:
            stats.ok += 1
        else:
            stats.errors += 1
        done, self.done = self.done, None
        if done is not None:
            done(self, ok)

    def connection_lost(self, exc) -> None:
        self.dead = True
        self._finish(False)

    def abort(self) -> None:
        if not self.dead:
            self.dead = True
            if self.transport is not None:
                self.transport.abort()


async def connect(host: str, port: int, stats: Stats) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(lambda: Conn(stats), host, port), 10)
    return conn


def request_once(conn: Conn, data: bytes, count_events: bool = False) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()

    def done(_conn, ok):
        if not future.done():
            future.set_result(ok)
    conn.send(data, done, count_events)
    return future


# ---------------------------------------------------------------- modes

async def mode_rate(args, host, port, data) -> dict:
    """Open loop at a fixed rate; latency of the requests scheduled after the warm-up."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    idle: list[Conn] = [await connect(host, port, stats) for _ in range(4)]
    opened = 4
    latencies: list[float] = []
    measuring_from = args.warmup * args.rate
    total = int(args.rate * (args.warmup + args.duration))
    in_flight = 0
    dropped = 0
    max_late = 0.0
    all_done = asyncio.Event()
    conns = list(idle)

    def finished(conn: Conn, ok: bool, index: int) -> None:
        nonlocal in_flight
        in_flight -= 1
        if ok and index >= measuring_from:
            latencies.append(conn.t_end - conn.t_send)
            if trace is not None:
                trace.append((conn.t_send - wall_start, conn.t_end - conn.t_send))
        if not conn.dead:
            idle.append(conn)
        if in_flight == 0 and sent_all:
            all_done.set()

    sent_all = False
    trace: list[tuple[float, float]] | None = [] if args.trace else None
    start = loop.time() + 0.02
    wall_start = time.perf_counter()
    for index in range(total):
        target = start + index / args.rate
        delay = target - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_late = max(max_late, -delay)
        conn = None
        now = time.perf_counter()
        while idle:
            candidate = idle.pop()
            if not candidate.dead and now - candidate.last_used < IDLE_DISCARD_S:
                conn = candidate
                break
            candidate.abort()
        if conn is None:
            if opened >= args.max_connections:
                dropped += 1
                continue
            opened += 1
            try:
                conn = await connect(host, port, stats)
            except (OSError, asyncio.TimeoutError):
                stats.errors += 1
                continue
            conns.append(conn)
        in_flight += 1
        conn.send(data, lambda c, ok, i=index: finished(c, ok, i))
    sent_all = True
    elapsed_send = time.perf_counter() - wall_start
    if in_flight:
        try:
            await asyncio.wait_for(all_done.wait(), args.drain_seconds)
        except asyncio.TimeoutError:
            pass
    unfinished = in_flight
    for conn in conns:
        conn.abort()
    if trace is not None:
        with open(args.trace, "w") as out:
            out.writelines(f"{at:.6f} {latency * 1e3:.4f}\n" for at, latency in trace)
    return {
        "mode": "rate", "rate": args.rate, "duration_s": args.duration, "sent": total - dropped, "dropped": dropped,
        "ok": stats.ok, "errors": stats.errors, "unfinished": unfinished, "status": stats.status,
        "connections": opened, "send_seconds": round(elapsed_send, 3), "max_late_ms": round(max_late * 1e3, 3),
        "measured": len(latencies),
        "p50_ms": _ms(percentile(latencies, 50)), "p90_ms": _ms(percentile(latencies, 90)),
        "p99_ms": _ms(percentile(latencies, 99)), "p999_ms": _ms(percentile(latencies, 99.9)),
        "max_ms": _ms(max(latencies) if latencies else None),
    }


async def mode_closed(args, host, port, data) -> dict:
    """`connections` connections, each sending its next request when the last one ended, up to a count."""
    stats = Stats()
    conns = [await connect(host, port, stats) for _ in range(args.connections)]
    remaining = args.requests
    deadline = time.perf_counter() + args.max_seconds

    async def worker(conn: Conn) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            if conn.dead:
                conn = await connect(host, port, stats)
            await request_once(conn, data)
        conn.abort()

    start = time.perf_counter()
    await asyncio.gather(*(worker(conn) for conn in conns))
    elapsed = time.perf_counter() - start
    return {"mode": "closed", "connections": args.connections, "ok": stats.ok, "errors": stats.errors,
            "status": stats.status, "seconds": round(elapsed, 3), "rps": round(stats.ok / elapsed, 1),
            "complete": remaining <= 0}


async def mode_stream(args, host, port, data) -> dict:
    """`streams` connections, each streaming request after request; SSE events counted over a window."""
    stats = Stats()
    conns = await asyncio.gather(*(connect(host, port, stats) for _ in range(args.streams)))
    stop = False
    ttfts: list[float] = []
    completed = 0

    async def worker(conn: Conn) -> None:
        nonlocal completed
        while not stop:
            if conn.dead:
                try:
                    conn = await connect(host, port, stats)
                except (OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)
                    continue
            ok = await request_once(conn, data, count_events=True)
            if ok:
                completed += 1
                if conn.t_first:
                    ttfts.append(conn.t_first - conn.t_send)
        conn.abort()

    tasks = [asyncio.ensure_future(worker(conn)) for conn in conns]
    await asyncio.sleep(args.warmup)
    before, t0 = stats.events, time.perf_counter()
    await asyncio.sleep(args.duration)
    after, t1 = stats.events, time.perf_counter()
    errors = stats.errors  # streams cut by the stop below are not errors
    stop = True
    for conn in conns:
        conn.abort()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"mode": "stream", "streams": args.streams, "events": after - before, "seconds": round(t1 - t0, 3),
            "events_per_s": round((after - before) / (t1 - t0), 1), "streams_completed": completed,
            "errors": errors, "status": stats.status, "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "events_total": stats.events}  # warm-up included: what a CPU reading around the whole run relayed


async def mode_ttft(args, host, port, data) -> dict:
    """One keep-alive connection, one stream after another: time from the request's write to its first event."""
    stats = Stats()
    conn = await connect(host, port, stats)
    ttfts: list[float] = []
    totals: list[float] = []
    deadline = time.perf_counter() + args.max_seconds
    for index in range(args.count + args.warmup_count):
        if time.perf_counter() > deadline:
            break
        if conn.dead:
            conn = await connect(host, port, stats)
        ok = await request_once(conn, data, count_events=True)
        if ok and conn.t_first and index >= args.warmup_count:
            ttfts.append(conn.t_first - conn.t_send)
            totals.append(conn.t_end - conn.t_send)
    conn.abort()
    return {"mode": "ttft", "measured": len(ttfts), "errors": stats.errors, "status": stats.status,
            "p50_ms": _ms(percentile(ttfts, 50)), "p90_ms": _ms(percentile(ttfts, 90)),
            "p99_ms": _ms(percentile(ttfts, 99)), "stream_p50_ms": _ms(percentile(totals, 50))}


async def mode_hold(args, host, port, data) -> dict:
    """Open `streams` streams and keep them open; report once each has its first event (or time ran out)."""
    stats = Stats()
    conns: list[Conn] = []
    t0 = time.perf_counter()
    for start in range(0, args.streams, 100):  # in batches: the accept backlog stays calm
        batch = await asyncio.gather(*(connect(host, port, stats) for _ in range(min(100, args.streams - start))),
                                     return_exceptions=True)
        for conn in batch:
            if isinstance(conn, Conn):
                conn.send(data, None, count_events=True)
                conns.append(conn)
        await asyncio.sleep(0.01)
    deadline = time.perf_counter() + args.open_seconds
    while time.perf_counter() < deadline:
        live = sum(1 for c in conns if c.t_first and not c.dead)
        if live >= args.streams:
            break
        await asyncio.sleep(0.05)
    live = sum(1 for c in conns if c.t_first and not c.dead and c.busy)
    report = {"mode": "hold", "requested": args.streams, "connected": len(conns), "streaming": live,
              "errors": stats.errors, "status": stats.status, "open_seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(report), flush=True)
    end = time.perf_counter() + args.hold_seconds
    while time.perf_counter() < end:
        await asyncio.sleep(0.2)
    for conn in conns:
        conn.abort()
    return {"mode": "hold-end", "still_streaming": sum(1 for c in conns if c.busy and not c.dead)}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 4)


MODES = {"rate": mode_rate, "closed": mode_closed, "stream": mode_stream, "ttft": mode_ttft, "hold": mode_hold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body, or @FILE to read it from FILE")
    parser.add_argument("--header", action="append", default=[], help="an extra 'Name: value' header")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--trace", help="rate: write 'seconds-since-start latency-ms' per measured request here")
    parser.add_argument("--drain-seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--max-seconds", type=float, default=120)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--warmup-count", type=int, default=20)
    parser.add_argument("--open-seconds", type=float, default=60)
    parser.add_argument("--hold-seconds", type=float, default=60)
    args = parser.parse_args()
    body = open(args.body[1:], "rb").read() if args.body.startswith("@") else args.body.encode()
    host, port, data = build_request(args.url, body, args.header)
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(MODES[args.mode](args, host, port, data))
    print(json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Closed-loop streaming load for /v1/chat/completions: N concurrent streams, one keep-alive connection each.

Per request it records the time to the first content token, the gap before every later content event (the
inter-token latency, as vLLM's `bench serve` counts it: one SSE event is one token here, since every token of
the benchmark model is a whole word) and the usage the server reports. asyncio + httptools + orjson on uvloop:
at 256 streams and ~5,000 tokens/s it uses a fraction of one core, so the client is never the bottleneck.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import orjson


@dataclass
class Record:
    ok: bool = False
    status: int = 0
    t_send: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0
    tokens: int = 0                      # content events received
    usage_completion: int | None = None  # what the server says it generated
    itls: list[float] = field(default_factory=list)
    error: str | None = None
    gateway_ms: float | None = None      # the gateway's own time before the response head (its Server-Timing)

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.record: Record | None = None
        self.done: asyncio.Future | None = None
        self.buffer = b""
        self.last = 0.0
        self.closed = False
        self.keep_alive = True
        self.got_bytes = False
        self.error_body = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._finish(False, f"connection lost: {exc}")

    def send(self, data: bytes, record: Record) -> asyncio.Future:
        self.record, self.buffer, self.error_body, self.got_bytes = record, b"", b"", False
        self.done = asyncio.get_running_loop().create_future()
        self.parser = httptools.HttpResponseParser(self)
        record.t_send = self.last = time.perf_counter()
        self.transport.write(data)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(False, f"bad HTTP: {exc}")

    def on_header(self, name: bytes, value: bytes) -> None:
        # `Server-Timing: gateway;dur=0.412, upstream;dur=3.1`: the gateway's time apart from the backend's, measured
        # by itself; llama-server's own spread (± ms at one stream) does not blur it as it blurs TTFT.
        if name.lower() == b"server-timing" and value.startswith(b"gateway;dur="):
            self.record.gateway_ms = float(value[12:].split(b",", 1)[0])

    def on_headers_complete(self) -> None:
        self.record.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        if self.record.status != 200:
            self.error_body += body
            return
        self.buffer += body
        *events, self.buffer = self.buffer.split(b"\n\n")
        record = self.record
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                chunk = orjson.loads(payload)
                if chunk.get("error"):
                    record.error = str(chunk["error"])[:300]
                usage = chunk.get("usage")
                if usage:
                    record.usage_completion = usage.get("completion_tokens")
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        if record.t_first is None:
                            record.t_first = now
                        else:
                            record.itls.append(now - self.last)
                        self.last = now
                        record.tokens += 1

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.record.status != 200:
            self._finish(False, f"HTTP {self.record.status}: {self.error_body[:300]!r}")
        else:
            self._finish(self.record.error is None, self.record.error)

    def _finish(self, ok: bool, error: str | None) -> None:
        if self.done is None or self.done.done():
            return
        self.record.ok, self.record.t_end = ok, time.perf_counter()
        if error and not self.record.error:
            self.record.error = error
        self.done.set_result(ok)


def build_request(url: str, key: str | None, body: dict) -> bytes:
    parts = urlsplit(url)
    payload = orjson.dumps(body)
    head = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Accept: text/event-stream"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def run_streams(url: str, key: str | None, bodies: list[dict], concurrency: int,
                      timeout_s: float = 600.0) -> tuple[list[Record], float]:
    """Send every body once, `concurrency` at a time (closed loop); returns the records and the wall time."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    loop = asyncio.get_running_loop()
    queue = list(enumerate(bodies))
    queue.reverse()
    records: list[Record | None] = [None] * len(bodies)

    async def worker() -> None:
        conn: _Conn | None = None
        while queue:
            index, body = queue.pop()
            for attempt in (1, 2):
                record = records[index] = Record()
                reused = conn is not None and not conn.closed
                try:
                    if not reused:
                        _, conn = await loop.create_connection(_Conn, host, port)
                    await asyncio.wait_for(conn.send(build_request(url, key, body), record), timeout_s)
                except (OSError, asyncio.TimeoutError) as exc:
                    record.ok, record.error = False, f"{type(exc).__name__}: {exc}"
                # A kept-alive connection the server closed before answering anything: send again on a new one
                # (what every HTTP client does); any other failure counts.
                retry = not record.ok and reused and not conn.got_bytes and attempt == 1
                if conn is not None and (not record.ok or not conn.keep_alive or conn.closed):
                    if conn.transport is not None:
                        conn.transport.close()  # a failed response may leave the stream mid-body
                    conn = None
                if not retry:
                    break
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return [r for r in records if r is not None], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation): a value that was really observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summarise(records: list[Record], wall_s: float) -> dict:
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in records if not r.ok]
    own = [r.gateway_ms / 1000 for r in ok if r.gateway_ms is not None]
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "requests": len(records), "ok": len(ok), "errors": len(errors), "first_errors": errors[:3],
        "wall_s": round(wall_s, 3),
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(itls, 50)), "itl_p99_ms": ms(percentile(itls, 99)),
        "gateway_own_p50_ms": ms(percentile(own, 50)), "gateway_own_p99_ms": ms(percentile(own, 99)),
        "output_tokens": tokens,
        "usage_completion_tokens": sum(r.usage_completion or 0 for r in ok),
        "output_tokens_per_s": round(tokens / wall_s, 2) if wall_s else None,
        "requests_per_s": round(len(ok) / wall_s, 4) if wall_s else None,
    }

"""bench/gpu's load generator against a scripted SSE server: what it counts as TTFT, ITL and tokens."""

import asyncio
import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench" / "gpu"))

from streams import percentile, run_streams, summarise  # noqa: E402

GAP_S = 0.02


async def sse_server(tokens: int, status: int = 200):
    """Answers every request with `tokens` content events GAP_S apart (after a role-only event), then usage."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            if status != 200:
                body = b'{"error": {"message": "no"}}'
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

            def chunk(payload: bytes) -> None:
                writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))

            chunk(b"data: " + orjson.dumps({"choices": [{"delta": {"role": "assistant"}}]}) + b"\n\n")
            for i in range(tokens):
                await asyncio.sleep(GAP_S)
                chunk(b"data: " + orjson.dumps({"choices": [{"delta": {"content": f" w{i}"}}]}) + b"\n\n")
                await writer.drain()
            chunk(b"data: " + orjson.dumps({"choices": [], "usage": {"completion_tokens": tokens}}) + b"\n\n"
                  + b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_counts_tokens_ttft_and_gaps():
    server, port = await sse_server(tokens=5)
    async with server:
        records, wall = await run_streams(f"http://127.0.0.1:{port}/v1/chat/completions", "k",
                                          [{"n": i} for i in range(6)], concurrency=3)
    assert len(records) == 6 and all(r.ok for r in records)
    assert all(r.tokens == 5 and r.usage_completion == 5 and len(r.itls) == 4 for r in records)
    assert all(GAP_S * 0.8 < r.ttft < GAP_S * 5 for r in records)
    assert all(GAP_S * 0.5 < gap < GAP_S * 5 for r in records for gap in r.itls)
    summary = summarise(records, wall)
    assert summary["ok"] == 6 and summary["output_tokens"] == 30 and summary["usage_completion_tokens"] == 30
    assert 2 * 5 * GAP_S * 0.9 < wall  # two waves of three


async def test_http_errors_are_counted_not_raised():
    server, port = await sse_server(tokens=1, status=401)
    async with server:
        records, wall = await run_streams(f"http://127.0.0.1:{port}/v1/chat/completions", None, [{}] * 3, 2)
    summary = summarise(records, wall)
    assert summary["ok"] == 0 and summary["errors"] == 3
    assert "HTTP 401" in summary["first_errors"][0]


@pytest.mark.parametrize("q, expected", [(50, 5), (99, 10), (100, 10), (1, 1), (10, 1), (11, 2)])
def test_percentile_is_nearest_rank(q, expected):
    assert percentile(list(range(10, 0, -1)), q) == expected

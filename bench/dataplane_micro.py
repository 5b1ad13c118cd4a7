"""CPU per request of the gateway's own work on the hot path (parse, auth, route, sampling, metrics,
headers, relay of a canned reply), in process, with the upstream transport replaced by canned bytes.

    python bench/dataplane_micro.py [--requests 20000] [--profile] [--stream]

`--stream` relays a canned llama.cpp-style stream of 20 chunk events (+ usage, [DONE]) per request instead.

reference/hot-path.md budgets this at about 80 µs to stay ahead of a Rust router.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import tempfile
import time

import orjson

from backends.llamacpp import LlamaCppDriver
from gateway.app import create_app
from gateway.config import GatewayConfig

REPLY = orjson.dumps({"id": "x", "object": "chat.completion", "model": "up", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})
BODY = orjson.dumps({"model": "kimi", "messages": [{"role": "user", "content": "Hello, how are you today?"}],
                     "max_tokens": 16})
STREAM_BODY = orjson.dumps({**orjson.loads(BODY), "stream": True})


def llama_event(choices: list, **extra) -> bytes:
    """llama-server's chunk: sorted keys, its build as system_fingerprint."""
    return b"data: " + orjson.dumps({"choices": choices, "created": 1795387761, "id": "chatcmpl-JOqeT7",
                                     "model": "up", "system_fingerprint": "b1-0c1e570",
                                     "object": "chat.completion.chunk", **extra}) + b"\n\n"


def delta(content: dict, finish: str | None = None) -> list:
    return [{"finish_reason": finish, "index": 0, "delta": content}]


STREAM_EVENTS = ([llama_event(delta({"role": "assistant", "content": None}))]
                 + [llama_event(delta({"content": " word"})) for _ in range(18)]
                 + [llama_event(delta({}, "length")),
                    llama_event([], usage={"completion_tokens": 19, "prompt_tokens": 9, "total_tokens": 28}),
                    b"data: [DONE]\n\n"])


class CannedResponse:
    status, headers = 200, {}

    async def read(self) -> bytes:
        return REPLY

    async def iter_bytes(self):
        for event in STREAM_EVENTS:  # one event per TCP read, as a token-by-token stream arrives
            yield event

    async def aclose(self) -> None:
        pass


class CannedTransport:
    async def request(self, method, path, body=b"", headers=None):
        return CannedResponse()

    async def aclose(self) -> None:
        pass


async def run(requests: int, cycles: bool = False, stream: bool = False) -> float:
    config = GatewayConfig.model_validate({"state_dir": tempfile.mkdtemp(),
                                           "backends": [{"name": "up", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
                                           "routes": [{"name": "kimi", "targets": ["up"]}]})
    app = create_app(config, drivers={"up": LlamaCppDriver("up", [CannedTransport()], adapters={})})
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"content-type", b"application/json"), (b"authorization", b"Bearer x")]}
    sent = []

    def exchange():
        """ASGI receive/send for one request, as uvicorn behaves: the body, then `http.disconnect` once the
        response is complete."""
        delivered, complete = False, asyncio.Event()

        async def receive():
            nonlocal delivered
            if delivered:
                await complete.wait()
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": STREAM_BODY if stream else BODY, "more_body": False}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete.set()
        return receive, send

    for _ in range(500):  # warm up
        await app(scope, *exchange())
    sent.clear()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL) if cycles else None
    start = time.process_time()
    for _ in range(requests):
        await app(scope, *exchange())
    spent = time.process_time() - start
    assert sent[0]["status"] == 200, sent[:2]
    if cycles:
        gc.collect()
        print(f"objects in reference cycles per request: {len(gc.garbage) / requests:.1f}")
        gc.set_debug(0)
        gc.garbage.clear()
    return spent / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cycles", action="store_true", help="count objects only the cyclic GC frees")
    parser.add_argument("--stream", action="store_true", help="relay a canned 20-chunk stream per request")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(run(args.requests, stream=args.stream))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        return
    import uvloop
    cpu = uvloop.run(run(args.requests, args.cycles, args.stream))
    kind = "streamed request (20 chunks)" if args.stream else "request"
    print(f"gateway work per {kind} (no transport, no HTTP server): {cpu:.1f} µs CPU")


if __name__ == "__main__":
    main()

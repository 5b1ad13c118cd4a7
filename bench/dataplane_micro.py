"""CPU per request of the gateway's own work on the hot path (parse, auth, route, sampling, metrics,
headers, access log, relay of a canned reply), in process, with the upstream transport replaced by canned bytes.

    python bench/dataplane_micro.py [--requests 20000] [--stream] [--profile] [--bare]

Every per-request feature is on, as `serve` runs by default: a client key with rpm/tpm limits, the default
metrics and sampling policy, the request-id and x-kimi-* headers, and the JSON access log (its writer thread
writes to /dev/null). `--bare` is the older setup: an open gateway, no access log.
After each request the loop runs once (as under a server, where every request is a task of its own), so the
request's hang-up watcher runs and ends inside the measured loop instead of piling up as pending tasks (which
made the cyclic GC, not the gateway, a third of the figure).

--stream relays a canned 32-event stream in SGLang's exact shape (`"usage":null` on every chunk, then the
usage chunk the gateway asked for and hides) instead of a JSON reply. --llamacpp relays llama.cpp's stream (its field
order, build fingerprint, `timings` on the usage chunk), paced: a turn of the event loop before each event, as a GPU
server's one-token writes arrive, so the relay's per-read cost (every await and call per event) is in the figure.

reference/hot-path.md budgets this at about 80 µs to stay ahead of a Rust router.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import os
import pstats
import tempfile
import time

import orjson

import checkout  # noqa: E402
checkout.use()  # this checkout's packages, not the venv's installed ones

from backends.config import OutlierConfig, RetryBudgetConfig  # noqa: E402
from backends.llamacpp import LlamaCppDriver
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.logs import configure_logging
from gateway.telemetry_config import LoggingConfig

REPLY = orjson.dumps({"id": "x", "object": "chat.completion", "model": "up", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})
BODY = orjson.dumps({"model": "kimi", "messages": [{"role": "user", "content": "Hello, how are you today?"}],
                     "max_tokens": 16})
STREAM_BODY = orjson.dumps({**orjson.loads(BODY), "stream": True})
AB_BODY = orjson.dumps({**orjson.loads(BODY), "model": "ab", "user": "user-42"})
KEY = "sk-bench-key"
os.environ.setdefault("KIMI_BENCH_KEY", KEY)


def full_config() -> dict:
    """Every per-request feature on: a client key with limits (never reached), metrics, sampling, headers."""
    return {"state_dir": tempfile.mkdtemp(),
            "auth": {"client_keys": [{"name": "bench", "key_env": "KIMI_BENCH_KEY", "models": ["*"],
                                      "rpm": 10_000_000, "tpm": 1_000_000_000}]},
            "backends": [{"name": "up", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
            "routes": [{"name": "kimi", "targets": ["up"]}]}


def access_log(on: bool = True, flush_s: float | None = None) -> None:
    """The default logging of `serve` (JSON lines, access log on), written to /dev/null; off: no handler.
    `flush_s`: how often the writer thread wakes (bench/instr_guard.py stretches it as valgrind stretches time)."""
    root = logging.getLogger()
    if not on:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(logging.WARNING)
        return
    handler = configure_logging(LoggingConfig())
    handler.stream = open(os.devnull, "w")
    if flush_s is not None:
        handler.FLUSH_S = flush_s


def sglang_chunk(delta: dict, finish: str | None = None) -> bytes:
    full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None, **delta}
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                                     "choices": [{"index": 0, "delta": full, "logprobs": None, "finish_reason": finish,
                                                  "matched_stop": None}], "usage": None}) + b"\n\n"


# One TCP read per event, as a backend streaming token by token delivers them.
STREAM_PIECES = ([sglang_chunk({"role": "assistant", "content": ""})]
                 + [sglang_chunk({"content": f" word{i}"}) for i in range(30)]
                 + [sglang_chunk({}, "stop"),
                    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"up","choices":[],'
                    b'"usage":{"prompt_tokens":9,"completion_tokens":30,"total_tokens":39}}\n\n',
                    b"data: [DONE]\n\n"])


def llamacpp_chunk(choices: bytes, tail: bytes = b"") -> bytes:
    """A chunk in llama-server's own field order (reference/llamacpp.md); `tail`: the last chunk's usage and timings."""
    return (b'data: {"choices":' + choices + b',"created":1764604800,"id":"chatcmpl-Jq3xV1bYk9Rm2TzLw8Pc0dHn",'
            b'"model":"kimi-k2.gguf","system_fingerprint":"b7120-0c1e570","object":"chat.completion.chunk"'
            + tail + b"}\n\n")


# llama.cpp's stream as a GPU server writes it, one token per write: paced, each piece comes after a turn of the
# event loop, so every event resumes the relay from the loop as a socket's read does (the per-read cost).
LLAMACPP_PIECES = ([llamacpp_chunk(b'[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]')]
                   + [llamacpp_chunk(b'[{"finish_reason":null,"index":0,"delta":{"content":" word%d"}}]' % i)
                      for i in range(30)]
                   + [llamacpp_chunk(b'[{"finish_reason":"stop","index":0,"delta":{}}]'),
                      llamacpp_chunk(b"[]", b',"usage":{"completion_tokens":30,"prompt_tokens":9,"total_tokens":39,'
                                     b'"prompt_tokens_details":{"cached_tokens":0}},"timings":{"cache_n":0,"prompt_n":9,'
                                     b'"prompt_ms":4.1,"prompt_per_token_ms":0.45,"prompt_per_second":2195.1,'
                                     b'"predicted_n":30,"predicted_ms":150.2,"predicted_per_token_ms":5.0,'
                                     b'"predicted_per_second":199.7}'),
                      b"data: [DONE]\n\n"])


class CannedResponse:
    status = 200

    def __init__(self, stream: bool, pieces: list[bytes] | None = None, paced: bool = False) -> None:
        self.headers = {"content-type": "text/event-stream" if stream else "application/json"}
        self.pieces, self.paced = pieces if pieces is not None else STREAM_PIECES, paced
        self._rest, self._left = iter(self.pieces), len(self.pieces)

    async def read(self) -> bytes:
        return REPLY

    async def iter_bytes(self):
        if not self.paced:
            for piece in self.pieces:
                yield piece
            return
        for piece in self.pieces:
            await asyncio.sleep(0)   # a turn of the loop before each piece, as a socket's read wakes the relay
            yield piece

    async def next_piece(self) -> bytes | None:
        """iter_bytes() one piece at a time (None at the end), as the lean transport's UpstreamResponse.next_piece()."""
        if self.paced and self._left:
            self._left -= 1
            await asyncio.sleep(0)
        return next(self._rest, None)

    def first_event_received(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class CannedTransport:
    def __init__(self, pieces: list[bytes] | None = None, paced: bool = False) -> None:
        self.pieces, self.paced = pieces, paced

    async def request(self, method, path, body=b"", headers=None):
        body = body() if callable(body) else body  # llama.cpp builds its body on the connection
        return CannedResponse(b'"stream":true' in body, self.pieces, self.paced)

    async def aclose(self) -> None:
        pass


def build(stream: bool = False, config: dict | None = None, key: str = KEY, slots: int | None = None,
          body: bytes | None = None, llamacpp: bool = False):
    """The app on canned upstream bytes, its scope, and a factory of one request's ASGI receive/send;
    `sent` collects what the app sent (bench/instr_guard.py drives the same requests under callgrind).
    `llamacpp`: the stream is llama.cpp's, paced (LLAMACPP_PIECES), instead of SGLang's."""
    config = GatewayConfig.model_validate(config or {
        "state_dir": tempfile.mkdtemp(), "backends": [{"name": "up", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi", "targets": ["up"]}]})
    driver = LlamaCppDriver("up", [CannedTransport(LLAMACPP_PIECES, paced=True) if llamacpp else CannedTransport()])
    if slots is not None:  # the admission queue's uncontended path: a slot leased and released per request
        driver.configure_traffic(slots, OutlierConfig(), RetryBudgetConfig())
    app = create_app(config, drivers={"up": driver})
    # the lean server's hang-up callback (gateway/http_server.py): registered per request, never called here
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"content-type", b"application/json"), (b"authorization", b"Bearer " + key.encode())],
        "extensions": {"kimi.disconnect": lambda callback: None}}
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
            return {"type": "http.request", "body": body or (STREAM_BODY if stream else BODY), "more_body": False}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete.set()
        return receive, send
    return app, scope, exchange, sent


def experiment_config(requests: int) -> dict:
    """An A/B experiment over two base routes, sticky on `user`; room for every fact (no writer runs here)."""
    return {"state_dir": tempfile.mkdtemp(),
            "backends": [{"name": "up", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
            "routes": [{"name": "kimi", "targets": ["up"]}, {"name": "kimi-b", "targets": ["up"]},
                       {"name": "ab", "experiment": {"variants": {"kimi": 90, "kimi-b": 10}}}],
            "experiments": {"queue_size": requests + 1000}}


async def one(app, scope, exchange) -> None:
    """One request, then one turn of the loop (the tasks it started run, as they would under a server)."""
    await app(scope, *exchange())
    await asyncio.sleep(0)


async def run(requests: int, cycles: bool = False, stream: bool = False, experiment: bool = False,
              slots: int | None = None, bare: bool = False, llamacpp: bool = False) -> float:
    """µs of CPU per request. `bare`: an open gateway, and logging left as the caller set it up."""
    config = experiment_config(requests) if experiment else None if bare else full_config()
    app, scope, exchange, sent = build(stream or llamacpp, config, slots=slots, body=AB_BODY if experiment else None,
                                       llamacpp=llamacpp)
    if not bare:
        access_log()
    for _ in range(500):  # warm up
        await one(app, scope, exchange)
    sent.clear()
    gc.collect()
    gc.freeze()   # as serve's lifespan does after start-up (gateway/app.py)
    gc.set_debug(gc.DEBUG_SAVEALL) if cycles else None
    start = time.process_time()
    for _ in range(requests):
        await one(app, scope, exchange)
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
    parser.add_argument("--stream", action="store_true", help="relay a 32-event SGLang stream per request")
    parser.add_argument("--llamacpp", action="store_true",
                        help="relay a 33-event llama.cpp stream per request, paced: one event per loop turn")
    parser.add_argument("--experiment", action="store_true", help="a JSON request to an A/B experiment route")
    parser.add_argument("--max-concurrency", type=int, help="give the backend slots (the admission queue's path)")
    parser.add_argument("--bare", action="store_true", help="an open gateway without the access log")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(run(args.requests, stream=args.stream, llamacpp=args.llamacpp))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        return
    import uvloop
    cpu = uvloop.run(run(args.requests, args.cycles, args.stream, args.experiment, args.max_concurrency, args.bare,
                         args.llamacpp))
    what = "a paced 33-event llama.cpp stream" if args.llamacpp else "a 32-event stream" if args.stream else "a JSON reply"
    print(f"gateway work per request relaying {what} (no transport, no HTTP server): {cpu:.1f} µs CPU")


if __name__ == "__main__":
    main()

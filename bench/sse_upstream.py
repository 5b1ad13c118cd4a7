"""A small, fast fake OpenAI-compatible upstream for the benchmark (stdlib asyncio + httptools, uvloop if present).

    python bench/sse_upstream.py --port 9001 [--chunks 200] [--delay-ms 0] [--profile bench-slow=30:1000 ...]

- POST /v1/chat/completions and /v1/completions: with `"stream": true`, an SSE stream of `chunks`
  chat.completion.chunk events (one HTTP chunk each), a usage event and `data: [DONE]`, with `delay-ms` between
  events; otherwise a canned chat.completion. The request's `model` picks a profile (`--profile NAME=CHUNKS:DELAY_MS`),
  else the defaults apply. Events echo the request's model, so a relay that rewrites `model` has real work to do.
- GET /health -> 200 {"status":"ok"}; GET /lora-adapters -> [] (what the gateway's llama.cpp driver asks for);
  GET /v1/models lists the profiles' names (a Rust router such as smg discovers its workers' models there).
- `--model-port PORT=MODEL` also listens on PORT, where every request gets MODEL's profile and /v1/models lists
  MODEL alone: smg takes one model per worker and rewrites an alias to its canonical name, so it gets one
  worker URL per streaming profile (all served by this one process).

Keep-alive, chunked transfer encoding, TCP_NODELAY; head and first event go out in one write. A stream whose
client hangs up is cancelled. Not a general HTTP server: one request at a time per connection, no pipelining.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket

import httptools

try:
    import orjson

    def loads(raw: bytes):
        return orjson.loads(raw)
except ImportError:  # pragma: no cover - the project venv has orjson
    def loads(raw: bytes):
        return json.loads(raw)

YIELD_EVERY = 16  # back-to-back streams give the loop a turn this often, so concurrent streams interleave


def head(status: int, ctype: bytes, length: int | None) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"OK")
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    extra = b"Cache-Control: no-cache\r\n" if length is None else b""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%sConnection: keep-alive\r\n\r\n"
            % (status, reason, ctype, framing, extra))


def fixed(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return head(status, ctype, len(body)) + body


def as_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def completion_body(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }, separators=(",", ":")).encode()


def stream_events(model: str, chunks: int) -> list[bytes]:
    """The events of one stream, each framed as one HTTP chunk, the terminating chunk last."""
    def event(delta: dict, finish: str | None) -> bytes:
        doc = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    events = [event({"role": "assistant", "content": ""}, None)]
    events += [event({"content": f"tok{i} "}, None) for i in range(1, max(chunks - 1, 0))]
    events.append(event({}, "stop"))
    usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
             "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}}
    events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return [as_chunk(e) for e in events] + [b"0\r\n\r\n"]


def models_body(names: list[str]) -> bytes:
    return fixed(200, json.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": 1700000000, "owned_by": "bench"} for name in names]}).encode())


HEALTH = fixed(200, b'{"status":"ok"}')
LORA = fixed(200, b"[]")
NOT_FOUND = fixed(404, b'{"error":{"message":"not found","type":"not_found_error","code":404}}')
BAD_REQUEST = fixed(400, b'{"error":{"message":"bad request","type":"invalid_request_error","code":400}}')
SSE_HEAD = head(200, b"text/event-stream", None)


class Server:
    def __init__(self, chunks: int, delay_s: float, profiles: dict[str, tuple[int, float]]) -> None:
        self.chunks, self.delay_s, self.profiles = chunks, delay_s, profiles
        self._events: dict[tuple[str, int], list[bytes]] = {}
        self._completions: dict[str, bytes] = {}
        self.open_streams = 0
        self.streams_started = 0
        self.models = models_body(list(profiles))

    def events(self, model: str, chunks: int) -> list[bytes]:
        key = (model, chunks)
        if key not in self._events:
            if len(self._events) > 64:
                self._events.clear()
            self._events[key] = stream_events(model, chunks)
        return self._events[key]

    def completion(self, model: str) -> bytes:
        if model not in self._completions:
            if len(self._completions) > 64:
                self._completions.clear()
            self._completions[model] = fixed(200, completion_body(model))
        return self._completions[model]


class Connection(asyncio.Protocol):
    def __init__(self, server: Server, model: str | None = None) -> None:
        self.server = server
        self.model = model  # this port's fixed profile (--model-port), else the request's model picks it
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.task: asyncio.Task | None = None
        self.queue: list[tuple[bytes, bytes, bytes]] = []
        self.can_write: asyncio.Future | None = None
        self.closed = False

    # transport callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._wake()

    def pause_writing(self) -> None:
        if self.can_write is None or self.can_write.done():
            self.can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake()

    def _wake(self) -> None:
        if self.can_write is not None and not self.can_write.done():
            self.can_write.set_result(None)

    # parser callbacks
    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        request = (method, self.url, b"".join(self.body), self.parser.should_keep_alive())
        if self.task is not None and not self.task.done():
            self.queue.append(request)  # a pipelining client: answer in order after the stream in flight
        else:
            self.handle(*request)

    # answers
    def handle(self, method: bytes, url: bytes, body: bytes, keep_alive: bool = True) -> None:
        self.answer(method, url, body)
        if not keep_alive:
            if self.task is not None and not self.task.done():
                self.task.add_done_callback(lambda _: self.transport.close())
            else:
                self.transport.close()

    def answer(self, method: bytes, url: bytes, body: bytes) -> None:
        path = url.split(b"?", 1)[0]
        if path == b"/health":
            self.transport.write(HEALTH)
        elif path == b"/lora-adapters":
            self.transport.write(LORA)
        elif path == b"/v1/models":
            self.transport.write(models_body([self.model]) if self.model else self.server.models)
        elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                doc = loads(body)
                model = self.model or str(doc.get("model") or "bench")
            except Exception:
                self.transport.write(BAD_REQUEST)
                return
            if doc.get("stream"):
                chunks, delay_s = self.server.profiles.get(model, (self.server.chunks, self.server.delay_s))
                self.task = asyncio.ensure_future(self.stream(self.server.events(model, chunks), delay_s))
            else:
                self.transport.write(self.server.completion(model))
        else:
            self.transport.write(NOT_FOUND)

    async def stream(self, events: list[bytes], delay_s: float) -> None:
        server = self.server
        server.open_streams += 1
        server.streams_started += 1
        write = self.transport.write
        try:
            write(SSE_HEAD + events[0])
            last = len(events) - 1  # the terminating chunk follows [DONE] at once
            for index in range(1, len(events)):
                if delay_s and index < last:
                    await asyncio.sleep(delay_s)
                elif index % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if self.can_write is not None and not self.can_write.done():
                    await self.can_write
                if self.closed:
                    return
                write(events[index])
        finally:
            server.open_streams -= 1
        if self.queue and not self.closed:
            self.task = None
            self.handle(*self.queue.pop(0))


async def main_async(args) -> None:
    profiles = {}
    for spec in args.profile:
        name, _, rest = spec.partition("=")
        chunks, _, delay = rest.partition(":")
        profiles[name] = (int(chunks), float(delay or 0) / 1000)
    server = Server(args.chunks, args.delay_ms / 1000, profiles)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Connection(server), args.host, args.port, backlog=4096)
    for spec in args.model_port:
        port, _, model = spec.partition("=")
        await loop.create_server(lambda model=model: Connection(server, model), args.host, int(port), backlog=4096)
    print(f"sse_upstream listening on {args.host}:{args.port}", flush=True)
    async with srv:
        if args.seconds:
            await asyncio.sleep(args.seconds)
        else:
            await srv.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--chunks", type=int, default=200, help="events per stream before usage and [DONE]")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay between events (0: back to back)")
    parser.add_argument("--profile", action="append", default=[], metavar="MODEL=CHUNKS:DELAY_MS",
                        help="per-model override, e.g. bench-slow=60:1000")
    parser.add_argument("--model-port", action="append", default=[], metavar="PORT=MODEL",
                        help="also listen on PORT, answering every request with MODEL's profile")
    parser.add_argument("--seconds", type=float, default=0, help="exit after this long (0: run until killed)")
    args = parser.parse_args()
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""CPU per request of the upstream client alone: LeanTransport vs HttpxTransport, N POSTs with C in flight against
a canned keep-alive server in another process (so time.process_time counts the client only).

    python bench/transport_micro.py [--requests 3000] [--concurrency 32] [--loop uvloop|asyncio]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time

import httptools

import checkout
checkout.use()  # this checkout's packages, not the venv's installed ones
from backends.httpx_transport import HttpxTransport
from backends.transport import LeanTransport

BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1764000000,"model":"kimi-k2.5",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}'
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
REQUEST = b'{"model":"kimi-k2.5","messages":[{"role":"user","content":"Hi"}],"max_tokens":16}'


class CannedServer(asyncio.Protocol):
    """Answers every request on the connection with RESPONSE, keeping it alive."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(RESPONSE)


def serve(sock: socket.socket) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(CannedServer, sock=sock)
        await server.serve_forever()

    _run(main(), "uvloop")


async def measure(transport: LeanTransport | HttpxTransport, requests: int, concurrency: int) -> float:
    """µs of this process's CPU per request, after a warm-up that fills the pool."""

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await transport.request("POST", "/chat/completions", REQUEST)
            assert len(await response.read()) == len(BODY)

    await asyncio.gather(*(worker(10) for _ in range(concurrency)))
    started = time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    used_s = time.process_time() - started
    await transport.aclose()
    return used_s / (requests // concurrency * concurrency) * 1e6


async def compare(url: str, requests: int, concurrency: int) -> None:
    for name, transport in [
        ("LeanTransport", LeanTransport(url, max_connections=concurrency)),
        ("HttpxTransport", HttpxTransport(url, max_connections=concurrency)),
    ]:
        print(f"{name:15} {await measure(transport, requests, concurrency):8.1f} µs CPU per request")


def _run(main: object, loop: str) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    server = multiprocessing.Process(target=serve, args=(sock,), daemon=True)
    server.start()
    try:
        url = "http://127.0.0.1:%d/v1" % sock.getsockname()[1]
        print(f"{args.requests} POSTs, {args.concurrency} concurrent, {args.loop} loop, server in pid {server.pid}")
        _run(compare(url, args.requests, args.concurrency), args.loop)
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()

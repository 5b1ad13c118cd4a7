"""A client that hangs up mid-stream aborts the upstream request and counts as 499: through the lean server's
`kimi.disconnect` callback (no receive() watch), and through receive() under a server without it (uvicorn).
Both servers for real, over sockets; and the watcher on a scope that carries the extension."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import orjson
import pytest
import uvloop

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.http_server import DISCONNECT_EXTENSION
from tests.app_client import running
from tests.emulators.fake_driver import FakeDriver
from tests.unit.gateway.test_dataplane import CHAT, CONFIG, state_dir  # noqa: F401 (fixture)
from tests.unit.gateway.test_dataplane_faults import StallingDriver, requests_counted

STREAM = {**CHAT, "stream": True}


async def test_the_disconnect_callback_aborts_the_upstream_without_a_receive_watch():
    """The server calls the registered callback; receive() never says `http.disconnect` (it would block forever),
    so only the callback can end the request."""
    one = StallingDriver("one")
    app = create_app(GatewayConfig.model_validate(CONFIG), drivers={"one": one, "two": FakeDriver("two")})
    callbacks = []
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"content-type", b"application/json")], "query_string": b"", "server": ("127.0.0.1", 8080),
        "extensions": {DISCONNECT_EXTENSION: callbacks.append}}
    messages = [{"type": "http.request", "body": orjson.dumps(STREAM), "more_body": False}]
    first_event, received_after_body = asyncio.Event(), []

    async def receive():
        if messages:
            return messages.pop()
        received_after_body.append(True)
        await asyncio.Event().wait()

    async def send(message):
        if message["type"] == "http.response.body":
            first_event.set()

    async with running(app) as client:
        serving = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(first_event.wait(), 5)
        await asyncio.sleep(0.1)   # past the 25 ms after which a receive() watch would start
        assert len(callbacks) == 1 and not received_after_body
        callbacks[0]()   # the client hung up
        await asyncio.wait_for(serving, 5)
        counted = await requests_counted(client)
    assert one.replies[0].closed and counted == {"499": 1}


class Served:
    """The gateway app under `serve --http <http>`, on its own uvloop in a thread."""

    def __init__(self, app, http: str) -> None:
        from gateway.server import make_server
        from gateway.workers import bind

        self.server = make_server(app, "127.0.0.1", 0, True, http)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=loop.run_until_complete, args=(self.server.serve([sock]),), daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)

    def get(self, path: str) -> bytes:
        with self.connect() as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("http", ["lean", "uvicorn"])
def test_a_hang_up_mid_stream_aborts_the_upstream_under_either_server(http):
    one = StallingDriver("one")
    app = create_app(GatewayConfig.model_validate(CONFIG), drivers={"one": one, "two": FakeDriver("two")})
    served = Served(app, http)
    try:
        body = orjson.dumps(STREAM)
        sock = served.connect()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        data = b""
        while b"data: " not in data:   # the head, then the first event: the upstream is generating
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        sock.close()
        deadline = time.monotonic() + 5
        while not one.replies[0].closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert one.replies[0].closed
        metrics = served.get("/metrics").decode()
        assert 'kimi_gateway_requests_total{' in metrics
        counted = [line for line in metrics.splitlines()
                   if line.startswith("kimi_gateway_requests_total{") and not line.endswith(" 0.0")]
        assert len(counted) == 1 and 'code="499"' in counted[0] and counted[0].endswith(" 1.0")
    finally:
        served.stop()

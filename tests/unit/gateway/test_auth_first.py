"""The key is checked from the headers before the body is read: an unauthenticated client cannot make the
gateway buffer (or even wait for) up to max_body_bytes, and its connection is closed rather than drained."""
import asyncio

import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.emulators.fake_driver import FakeDriver

CONFIG = {"backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
          "routes": [{"name": "kimi", "targets": ["one"]}],
          "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}]}}


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "sk-team-0123456789")
    config = GatewayConfig.model_validate({**CONFIG, "state_dir": str(tmp_path)})
    return create_app(config, drivers={"one": FakeDriver("one")})


async def call(app, headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], int]:
    """Send the head of a request whose body never finishes arriving; (what the gateway sent, body reads)."""
    sent, reads, forever = [], 0, asyncio.Event()

    async def receive():
        nonlocal reads
        reads += 1
        if reads == 1:
            return {"type": "http.request", "body": b'{"model": "kimi", "messages": [', "more_body": True}
        await forever.wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000000000"), *headers]}
    await asyncio.wait_for(app(scope, receive, send), timeout=2)
    return sent, reads


@pytest.mark.parametrize("authorization", [None, b"Bearer wrong-key-0123", b"Basic dXNlcjpwYXNz"])
async def test_unauthenticated_gets_401_without_a_body_read(app, authorization):
    headers = [(b"authorization", authorization)] if authorization else []
    sent, reads = await call(app, headers)
    assert sent[0]["status"] == 401 and reads == 0
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b"invalid_api_key" in sent[1]["body"]


async def test_authenticated_requests_still_read_their_body(app):
    with pytest.raises(TimeoutError):  # the body never completes, so the gateway keeps waiting for it
        await call(app, [(b"authorization", b"Bearer sk-team-0123456789")])

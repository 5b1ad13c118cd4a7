"""x-request-id on every answer (data plane, control plane, admin, the front's own 404s); a well-formed
incoming id is kept and handed to the backend, anything else is replaced."""
import re

import httpx
import orjson
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.emulators.fake_driver import FakeDriver

CHAT = {"model": "kimi", "messages": [{"role": "user", "content": "hi"}]}
NEW_ID = re.compile(r"[0-9a-f]{24}")


@pytest.fixture
def client_for(tmp_path):
    def make(driver: FakeDriver, **overrides) -> httpx.AsyncClient:
        config = GatewayConfig.model_validate({
            "state_dir": str(tmp_path / "state"), "auth": {"admin_keys_env": "NO_SUCH_ADMIN_KEYS_VAR"},
            "backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
            "routes": [{"name": "kimi", "targets": ["one"]}], **overrides})
        app = create_app(config, drivers={"one": driver})
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway:8123")
    return make


@pytest.mark.parametrize("incoming, kept", [
    ("lb-7f3a.2026:11_x-1", True), ("slash/x", False), ("a" * 128, True), ("a" * 129, False),
    ("", False), ("has space", False), ('quote"d', False), ("é", False), ("0123456789abcdef01234567", True),
])
async def test_incoming_id_kept_only_when_well_formed(client_for, incoming, kept):
    driver = FakeDriver("one")
    async with client_for(driver) as client:
        response = await client.post("/v1/chat/completions", content=orjson.dumps(CHAT),
                                     headers={"x-request-id": incoming.encode("utf-8")})
    answered = response.headers["x-request-id"]
    assert response.status_code == 200
    assert (answered == incoming) is kept and (kept or NEW_ID.fullmatch(answered))
    assert driver.requests[0].request_id == answered


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "/v1/models/kimi"), ("GET", "/v1/models/nope"), ("GET", "/healthz"),
    ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/no/such/path"), ("GET", "/admin/adapters"),
    ("POST", "/admin/adapters"), ("GET", "/v1/chat/completions"), ("POST", "/v1/completions"),
])
async def test_every_control_plane_answer_carries_one(client_for, method, path):
    async with client_for(FakeDriver("one")) as client:
        fresh = await client.request(method, path)
        kept = await client.request(method, path, headers={"x-request-id": "from-the-lb-42"})
    assert NEW_ID.fullmatch(fresh.headers["x-request-id"]), (fresh.status_code, fresh.headers)
    assert kept.headers.get_list("x-request-id") == ["from-the-lb-42"]


async def test_the_fronts_own_404_carries_one(client_for):
    """With an admin listener, the front itself answers 404 for what belongs to the other port."""
    async with client_for(FakeDriver("one"), admin_listen={"host": "127.0.0.1", "port": 8123}) as client:
        response = await client.get("/v1/models", headers={"x-request-id": "abc"})
    assert response.status_code == 404 and response.headers["x-request-id"] == "abc"


def test_request_id_of():
    from gateway.request_id import request_id_of
    assert request_id_of(b"ok.id:1-2_3") == "ok.id:1-2_3"
    assert NEW_ID.fullmatch(request_id_of(None)) and NEW_ID.fullmatch(request_id_of(b"bad id"))
    assert request_id_of(None) != request_id_of(None)

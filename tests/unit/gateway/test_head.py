"""HEAD on the control plane's GET paths answers as GET does, without the body: the same status and headers,
the GET body's content-length. Paths without GET keep their 405 (and their `Allow`), which now lists HEAD
wherever it lists GET."""
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.app_client import running
from tests.emulators.fake_driver import FakeDriver

ADMIN = {"authorization": "Bearer admin-secret"}
TEAM = {"authorization": "Bearer team-secret"}
VARYING = {"date", "x-request-id", "server-timing"}   # one request's own, different on the next


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEYS", "admin-secret")
    monkeypatch.setenv("TEAM_KEY", "team-secret")
    config = GatewayConfig.model_validate({
        "state_dir": str(tmp_path / "state"),
        "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}]},
        "backends": [{"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi", "targets": ["kt"]}]})
    return running(create_app(config, drivers={"kt": FakeDriver("kt")}))


def headers_of(response) -> dict:
    return {k: v for k, v in response.headers.items() if k not in VARYING}


@pytest.mark.parametrize("path, headers", [
    ("/healthz", {}),
    ("/readyz", {}),
    ("/readyz", ADMIN),                   # with its details
    ("/metrics", {}),
    ("/openapi.json", ADMIN),
    ("/v1/models", TEAM),
    ("/v1/models/kimi", TEAM),
    ("/v1/models/nope", TEAM),            # GET's 404, as GET answers it
    ("/v1/models", {}),                   # GET's 401
    ("/admin/adapters", ADMIN),
    ("/admin/adapters", {}),              # GET's 401
    ("/admin/adapters/nope", ADMIN),
    ("/admin/backends", ADMIN),
    ("/admin/routes/kimi", ADMIN),
    ("/admin/experiments/nope", ADMIN),
    ("/no/such/path", {}),                # GET's 404
])
async def test_head_answers_as_get_without_the_body(client, path, headers):
    async with client as c:
        get = await c.get(path, headers=headers)
        head = await c.head(path, headers=headers)
    assert head.status_code == get.status_code, head.text
    assert head.content == b""             # the app sends no body, whatever the server would do with one
    if path == "/metrics":                # its counters moved between the two requests: only the shape is fixed
        assert head.headers["content-type"] == get.headers["content-type"] and int(head.headers["content-length"])
    else:
        assert headers_of(head) == headers_of(get)
        assert int(head.headers["content-length"]) == len(get.content) > 0
    assert head.headers["x-request-id"]


@pytest.mark.parametrize("path, allowed", [
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/admin/experiments/x/promote", "POST"),
    ("/v1/feedback", "POST"),
])
async def test_head_where_there_is_no_get_is_a_405(client, path, allowed):
    async with client as c:
        response = await c.head(path, headers=ADMIN)
    assert response.status_code == 405 and response.headers["allow"] == allowed


@pytest.mark.parametrize("method, path, allowed", [
    ("POST", "/v1/models", "GET, HEAD"),
    ("POST", "/healthz", "GET, HEAD"),
    ("PUT", "/admin/adapters/x", "DELETE, GET, HEAD"),
    ("POST", "/admin/routes/x", "DELETE, GET, HEAD, PUT"),
])
async def test_allow_lists_head_with_get(client, method, path, allowed):
    async with client as c:
        response = await c.request(method, path, headers=ADMIN, content=b"{}")
    assert response.status_code == 405 and response.headers["allow"] == allowed

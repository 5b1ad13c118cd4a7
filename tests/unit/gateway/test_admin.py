"""The admin API: its own keys, adapter registration with validation (422), persistence across restarts."""
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.adapter_files import write_peft
from tests.app_client import running
from tests.emulators.fake_driver import FakeDriver

ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    return root


@pytest.fixture
def make_client(tmp_path, roots, monkeypatch):
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEYS", "other-key, admin-secret")

    def make(**overrides):
        config = GatewayConfig.model_validate({
            "state_dir": str(tmp_path / "state"), "adapter_roots": [str(roots)],
            "backends": [{"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:9"}],
            "routes": [{"name": "kimi", "targets": ["kt"]}], **overrides})
        return running(create_app(config, drivers={"kt": FakeDriver("kt")}))
    return make


async def test_admin_refuses_all_without_configured_keys(make_client, monkeypatch):
    monkeypatch.delenv("KIMI_GATEWAY_ADMIN_KEYS")
    async with make_client() as client:
        response = await client.get("/admin/adapters", headers=ADMIN)
    assert response.status_code == 403 and "KIMI_GATEWAY_ADMIN_KEYS" in response.json()["error"]["message"]


async def test_admin_needs_an_admin_key(make_client):
    async with make_client() as client:
        assert (await client.get("/admin/adapters")).status_code == 401
        assert (await client.get("/admin/adapters", headers={"authorization": "Bearer nope"})).status_code == 401
        assert (await client.get("/admin/adapters", headers=ADMIN)).status_code == 200


async def test_register_persist_and_remove(make_client, roots):
    source = write_peft(roots / "legal")
    async with make_client() as client:
        created = await client.post("/admin/adapters", headers=ADMIN,
                                    json={"name": "legal", "source": str(source), "backends": ["kt"]})
        assert created.status_code == 201, created.text
        duplicate = await client.post("/admin/adapters", headers=ADMIN,
                                      json={"name": "legal", "source": str(source), "backends": ["kt"]})
        assert duplicate.status_code == 409
    async with make_client() as restarted:  # a new app on the same state_dir
        models = (await restarted.get("/v1/models")).json()["data"]
        assert "legal" in [m["id"] for m in models]
        assert (await restarted.delete("/admin/adapters/legal", headers=ADMIN)).status_code == 204
        assert (await restarted.delete("/admin/adapters/legal", headers=ADMIN)).status_code == 404
    async with make_client() as again:
        assert "legal" not in [m["id"] for m in (await again.get("/v1/models")).json()["data"]]


@pytest.mark.parametrize("source, message", [
    ("../etc", "'..' is not allowed"),
    ("/etc", "resolves outside the adapter roots"),
])
async def test_bad_paths_are_422(make_client, source, message):
    async with make_client() as client:
        response = await client.post("/admin/adapters", headers=ADMIN,
                                     json={"name": "bad", "source": source, "backends": ["kt"]})
    assert response.status_code == 422 and message in response.json()["error"]["message"]


async def test_unsafe_name_is_422(make_client, roots):
    async with make_client() as client:
        response = await client.post("/admin/adapters", headers=ADMIN,
                                     json={"name": "../evil", "source": str(roots), "backends": ["kt"]})
    assert response.status_code == 422 and response.json()["error"]["message"].startswith("Invalid request: name")


async def test_separate_admin_listener_hides_admin_from_the_main_port(make_client):
    async with make_client(admin_listen={"host": "127.0.0.1", "port": 9999}) as client:
        # httpx's ASGITransport reports the server as ("gateway", 80): the main port.
        assert (await client.get("/admin/adapters", headers=ADMIN)).status_code == 404
        assert (await client.get("/v1/models")).status_code == 200


class SwapsMidRequest(FakeDriver):
    """The first request for an adapter reaches the driver only after a swap retired the version it was
    routed to (as when it waited out a drained restart): the driver no longer serves that version."""

    swap = None

    async def send(self, request):
        if self.swap is not None and request.adapter is not None:
            swap, self.swap = self.swap, None
            await swap()
        return await super().send(request)


async def test_a_request_routed_to_a_version_swapped_out_meanwhile_is_answered_by_the_active_one(tmp_path, roots,
                                                                                                 monkeypatch):
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEYS", "admin-secret")
    v1, v2 = write_peft(roots / "v1", r=8), write_peft(roots / "v2", r=4)
    driver = SwapsMidRequest("kt")
    config = GatewayConfig.model_validate({
        "state_dir": str(tmp_path / "state"), "adapter_roots": [str(roots)],
        "backends": [{"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:9"}],
        "adapters": [{"name": "legal", "source": str(v1), "backends": ["kt"]}],
        "routes": [{"name": "kimi", "targets": ["kt"]}]})
    app = create_app(config, drivers={"kt": driver})
    async with running(app) as client:
        [before] = app.state.lifecycle.active()
        driver.swap = lambda: app.state.lifecycle.swap("legal", str(v2), None)
        response = await client.post("/v1/chat/completions", json={"model": "legal",
                                                                   "messages": [{"role": "user", "content": "hi"}]})
        [after] = app.state.lifecycle.active()
        assert after.label != before.label and before.label not in driver.serving
        assert response.status_code == 200, response.text
        assert response.headers["x-kimi-adapter"] == after.label
        assert [r.adapter for r in driver.requests] == [after.label]


async def test_a_swap_moves_the_active_version_and_its_series_and_a_failed_one_is_counted(make_client, roots):
    """The version that takes traffic is 1 and the one it replaced 0; the new version's request series exist
    at zero at once; a swap that fails (a missing source) counts as op=swap result=error."""
    v1, v2 = write_peft(roots / "v1", r=8), write_peft(roots / "v2", r=4)
    async with make_client(adapters=[{"name": "legal", "source": str(v1), "backends": ["kt"]}]) as client:
        before = (await client.get("/metrics")).text
        swapped = await client.post("/admin/adapters/legal/swap", headers=ADMIN, json={"source": str(v2)})
        assert swapped.status_code == 200, swapped.text
        failed = await client.post("/admin/adapters/legal/swap", headers=ADMIN, json={"source": str(roots / "gone")})
        assert failed.status_code >= 400
        metrics = (await client.get("/metrics")).text
    labels = sorted({line.split('version="', 1)[1].split('"', 1)[0] for line in metrics.splitlines()
                     if line.startswith("kimi_gateway_adapter_active_version{")})
    assert len(labels) == 2 and all(label.startswith("legal@") for label in labels)
    active = [label for label in labels
              if f'adapter_active_version{{adapter="legal",version="{label}"}} 1.0' in metrics]
    assert len(active) == 1 and f'version="{active[0]}"}} 1.0' not in before
    assert all(f'adapter_active_version{{adapter="legal",version="{label}"}} 1.0' in before
               for label in labels if label != active[0])
    assert (f'kimi_gateway_requests_total{{adapter="legal",backend="kt",code="200",route="legal",'
            f'version="{active[0]}"}} 0.0') in metrics
    assert 'kimi_gateway_adapter_operations_total{op="swap",result="ok"} 1.0' in metrics
    errors = [line for line in metrics.splitlines() if line.startswith("kimi_gateway_adapter_operations_total{")
              and 'op="swap"' in line and 'result="ok"' not in line and not line.endswith(" 0.0")]
    assert errors, metrics

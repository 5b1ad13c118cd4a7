"""Config `exposure`: /metrics, /openapi.json and /readyz details, public or admin-only (on the admin
listener when there is one, else behind an admin key)."""
import httpx
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.emulators.fake_driver import FakeDriver

ADMIN = {"authorization": "Bearer admin-secret"}
MAIN, ADMIN_PORT = 8080, 9091
ALL_ADMIN = {"metrics": "admin", "openapi": "admin", "readyz_details": "admin"}


@pytest.fixture
def make_app(tmp_path, monkeypatch):
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEYS", "admin-secret")

    def make(**overrides):
        config = GatewayConfig.model_validate({
            "state_dir": str(tmp_path / "state"), "backends": [{"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:9"}],
            "routes": [{"name": "kimi", "targets": ["kt"]}], **overrides})
        return create_app(config, drivers={"kt": FakeDriver("kt")})
    return make


def client(app, port: int = MAIN) -> httpx.AsyncClient:
    """httpx's ASGI transport puts the URL's host and port in scope["server"], as uvicorn does."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://gateway:{port}")


async def test_defaults_metrics_public_openapi_and_readyz_details_behind_the_admin_key(make_app):
    async with client(make_app()) as main:
        assert (await main.get("/metrics")).status_code == 200
        assert (await main.get("/openapi.json")).status_code == 401
        assert (await main.get("/openapi.json", headers=ADMIN)).json()["info"]["title"] == "kimi-gateway"
        assert set((await main.get("/readyz")).json()) == {"status"}
        assert set((await main.get("/readyz", headers=ADMIN)).json()) == {"status", "backends"}
        assert set((await main.get("/readyz", headers={"authorization": "Bearer nope"})).json()) == {"status"}


async def test_admin_exposure_without_an_admin_listener_needs_the_admin_key(make_app):
    async with client(make_app(exposure=ALL_ADMIN)) as main:
        refused = await main.get("/metrics")
        assert refused.status_code == 401 and "admin key" in refused.json()["error"]["message"]
        assert (await main.get("/metrics", headers=ADMIN)).text.startswith("# HELP")


async def test_admin_exposure_with_no_admin_key_configured_refuses_all(make_app, monkeypatch):
    monkeypatch.delenv("KIMI_GATEWAY_ADMIN_KEYS")
    async with client(make_app(exposure=ALL_ADMIN)) as main:
        assert (await main.get("/metrics", headers=ADMIN)).status_code == 403
        assert (await main.get("/openapi.json", headers=ADMIN)).status_code == 403


async def test_public_exposure_serves_everyone(make_app):
    async with client(make_app(exposure={"metrics": "public", "openapi": "public", "readyz_details": "public"})) as main:
        assert (await main.get("/openapi.json")).status_code == 200
        assert set((await main.get("/readyz")).json()) == {"status", "backends"}


async def test_admin_exposure_moves_to_the_admin_listener(make_app):
    app = make_app(exposure=ALL_ADMIN, admin_listen={"host": "127.0.0.1", "port": ADMIN_PORT})
    async with client(app) as main, client(app, ADMIN_PORT) as admin:
        for path in ("/metrics", "/openapi.json"):
            assert (await main.get(path, headers=ADMIN)).status_code == 404  # not even with the key
            assert (await admin.get(path)).status_code == 200                # the listener is the boundary
        assert set((await main.get("/readyz", headers=ADMIN)).json()) == {"status"}
        assert set((await admin.get("/readyz")).json()) == {"status", "backends"}
        assert (await admin.get("/admin/backends")).status_code == 401     # the admin API keeps its key
        assert (await admin.get("/healthz")).status_code == 404
        assert (await main.get("/healthz")).status_code == 200


async def test_public_metrics_stay_on_the_main_listener(make_app):
    app = make_app(admin_listen={"host": "127.0.0.1", "port": ADMIN_PORT})
    async with client(app) as main, client(app, ADMIN_PORT) as admin:
        assert (await main.get("/metrics")).status_code == 200
        assert (await admin.get("/metrics")).status_code == 404
        assert (await admin.get("/openapi.json")).status_code == 200
        assert (await main.get("/openapi.json", headers=ADMIN)).status_code == 404

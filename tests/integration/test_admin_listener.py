"""The admin API on its own listener, in the real process: only there, and with its own keys."""
from __future__ import annotations

import httpx

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import llama_config


def test_admin_only_on_its_listener(llama_server, tiny_models, start_gateway, processes):
    admin_port = free_port()
    url = start_gateway(llama_config(llama_server, tiny_models,
                                     admin_listen={"host": "127.0.0.1", "port": admin_port},
                                     auth={"admin_keys_env": "ADMIN_KEYS"}),
                        name="gateway-admin-listener", env={"ADMIN_KEYS": "admin-secret-123"})
    admin = f"http://127.0.0.1:{admin_port}"
    key = {"authorization": "Bearer admin-secret-123"}
    main = url.removesuffix("/v1")
    assert httpx.get(f"{main}/admin/backends", headers=key, timeout=10).status_code == 404
    backends = httpx.get(f"{admin}/admin/backends", headers=key, timeout=10)
    assert backends.status_code == 200 and backends.json()["data"][0]["name"] == "llama"
    assert httpx.get(f"{admin}/admin/backends", timeout=10).status_code == 401
    assert httpx.get(f"{admin}/v1/models", timeout=10).status_code == 404
    assert httpx.post(f"{main}/v1/chat/completions", timeout=30, json={
        "model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200
    gateway = next(p for p in processes if p.health_url.startswith(main))
    gateway.stop()
    assert gateway.process.returncode == 0


def test_admin_exposure_moves_introspection_to_the_admin_listener(llama_server, tiny_models, start_gateway):
    """In the real process (uvicorn's scope["server"]): /metrics and /openapi.json only on the admin port,
    keyless there; /readyz on both, its per-backend details only on the admin port."""
    admin_port = free_port()
    url = start_gateway(llama_config(llama_server, tiny_models,
                                     admin_listen={"host": "127.0.0.1", "port": admin_port},
                                     exposure={"metrics": "admin", "openapi": "admin", "readyz_details": "admin"},
                                     auth={"admin_keys_env": "ADMIN_KEYS"}),
                        name="gateway-admin-exposure", env={"ADMIN_KEYS": "admin-secret-456"})
    main, admin = url.removesuffix("/v1"), f"http://127.0.0.1:{admin_port}"
    key = {"authorization": "Bearer admin-secret-456"}
    for path in ("/metrics", "/openapi.json"):
        assert httpx.get(f"{main}{path}", headers=key, timeout=10).status_code == 404
        assert httpx.get(f"{admin}{path}", timeout=10).status_code == 200
    assert httpx.get(f"{main}/readyz", headers=key, timeout=10).json() == {"status": "ready"}
    assert httpx.get(f"{admin}/readyz", timeout=10).json() == {"status": "ready", "backends": {"llama": "up"}}

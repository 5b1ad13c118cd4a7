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

"""The app with two fake backends and a 90/10 experiment over two adapters, for the experiment API tests."""
from __future__ import annotations

import orjson

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.demo import tiny_gguf
from tests.app_client import running, write_adapter_set
from tests.emulators.fake_driver import FakeDriver

ADMIN = {"authorization": "Bearer admin-key-for-experiments"}
TEAM = {"authorization": "Bearer team-key-for-experiments"}
OTHER = {"authorization": "Bearer other-key-for-experiments"}


def make_config(tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEYS", ADMIN["authorization"][7:])
    monkeypatch.setenv("TEAM_KEY", TEAM["authorization"][7:])
    monkeypatch.setenv("OTHER_KEY", OTHER["authorization"][7:])
    files = write_adapter_set(tmp_path / "adapters")
    other = tiny_gguf.write_tiny_lora(tmp_path / "adapters" / "b.gguf", files["base"], seed=2, name="b")
    return {
        "state_dir": str(tmp_path / "state"),
        "adapter_roots": [str(tmp_path / "adapters")],
        "auth": {"client_keys": [{"name": "team", "key_env": "TEAM_KEY"}, {"name": "other", "key_env": "OTHER_KEY"}]},
        "backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"},
                     {"name": "two", "kind": "llamacpp", "url": "http://127.0.0.1:9", "retry": {"attempts": 1}}],
        "adapters": [{"name": "v1", "gguf": files["gguf"], "backends": ["one"]},
                     {"name": "v2", "gguf": str(other), "backends": ["two"]}],
        "routes": [{"name": "legal", "experiment": {
            "variants": {"v1": 90, "v2": 10},
            "guard": {"min_requests": 20, "max_error_rate_delta": 0.05}}}],
        "experiments": {"flush_interval_s": 0.05, "guard_interval_s": 0.05},
    }


def app(config: dict, one: FakeDriver | None = None, two: FakeDriver | None = None, **more: FakeDriver):
    return running(create_app(GatewayConfig.model_validate(config),
                              drivers={"one": one or FakeDriver("one"), "two": two or FakeDriver("two"), **more}))


async def chat(client, user: str, headers=TEAM):
    body = {"model": "legal", "user": user, "messages": [{"role": "user", "content": "hi"}]}
    return await client.post("/v1/chat/completions", content=orjson.dumps(body), headers=headers)



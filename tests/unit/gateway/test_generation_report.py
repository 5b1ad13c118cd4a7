"""`kimi-gateway check` names each backend's generation and each hosted route's id and retirement."""
from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.generation_report import generation_table


def test_generation_table():
    config = GatewayConfig.model_validate({
        "backends": [{"name": "kt", "kind": "sglang", "url": "http://s", "generation": "k2.6"},
                     {"name": "gguf", "kind": "llamacpp", "url": "http://l"},
                     {"name": "hosted", "kind": "moonshot", "url": "http://h", "api_key_env": "K",
                      "models": {"kimi-k2.5": "kimi-k2.6"}, "retirements": {"kimi-k2.6": "2099-01-01"}}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt", "hosted"]}, {"name": "moonshot-v1-8k", "targets": ["hosted"]},
                   {"name": "kimi-k3", "targets": ["gguf", "hosted"]}]})
    table = generation_table(config)
    assert "kt                       sglang, generation k2.6 (--reasoning-parser kimi_k2 --tool-call-parser kimi_k2)" in table
    assert "gguf                     llamacpp, generation read from /props" in table
    assert "kimi-k2.5 -> kimi-k2.6 (generation k2.6) retires on 2099-01-01" in table
    assert "moonshot-v1-8k -> moonshot-v1-8k (generation k2.5) RETIRED on 2026-08-31" in table
    assert "kimi-k3 -> kimi-k3 (generation k3)" in table

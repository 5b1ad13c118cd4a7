"""`api_key_env` on self-hosted backends, against the real llama-server started with `--api-key` and the SGLang
emulator with `--api-key`: the gateway's key reaches every call (chat, /lora-adapters, /props, /v1/models,
/load_lora_adapter, health), a missing key is the backend's fault (503), never the client's 401, and the key
appears in no log."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from backends.launchers.llamacpp import LlamaServerLaunch, free_port
from gateway.demo.tiny_gguf import write_demo_set
from tests.adapter_files import write_peft
from tests.integration.conftest import sdk
from tests.integration.test_sglang import received, start_sglang

LLAMA_KEY = "llama-backend-key-0123456789"
SGLANG_KEY = "sglang-backend-key-0123456789"
PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}}


@pytest.fixture(scope="module")
def keyed_llama(llama_binary, tmp_path_factory, start_process):
    """A Kimi-template llama-server with one LoRA that answers only with its --api-key (LLAMA_API_KEY names the
    same key for the conftest's leak search)."""
    models = write_demo_set(tmp_path_factory.mktemp("keyed-models"), chat_template="kimi")
    launch = LlamaServerLaunch(llama_binary, models.model, (models.lora_a,), port=free_port(), alias="tiny-kimi",
                               threads=1, extra=("-np", "1", "--api-key", LLAMA_KEY))
    start_process("llama-server-keyed", launch.argv(), f"{launch.url}/health", env={"LLAMA_API_KEY": LLAMA_KEY})
    return launch.url, models


def llama_gateway(start_gateway, keyed_llama, name: str, keyed: bool) -> str:
    url, models = keyed_llama
    backend = {"name": "llama", "kind": "llamacpp", "url": url, **({"api_key_env": "LLAMA_BACKEND_KEY"} if keyed else {})}
    return start_gateway({"adapter_roots": [str(models.model.parent)], "backends": [backend], "adapters": [{"name": "tiny-a", "gguf": str(models.lora_a),
                                                               "backends": ["llama"]}],
                          "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}],
                          "exposure": {"readyz_details": "public"}},
                         name=name, env={"LLAMA_BACKEND_KEY": LLAMA_KEY} if keyed else None)


def test_llama_server_with_api_key(keyed_llama, start_gateway):
    url, _ = keyed_llama
    assert httpx.get(f"{url}/lora-adapters", timeout=10).status_code == 401  # the server really wants its key
    gateway = llama_gateway(start_gateway, keyed_llama, "gateway-llama-keyed", keyed=True)
    client = sdk(gateway)
    assert client.chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=2).choices
    raw = client.chat.completions.with_raw_response.create(model="tiny-a", messages=PROMPT, max_tokens=2)
    assert raw.headers["x-kimi-adapter"].startswith("tiny-a@")            # /lora-adapters was read with the key
    structured = client.chat.completions.with_raw_response.create(
        model="kimi-k2.5", messages=PROMPT, max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    assert structured.headers["x-kimi-adjusted"] == "thinking=off:structured_output"  # /props too
    ready = httpx.get(gateway.removesuffix("/v1") + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["backends"] == {"llama": "up"}


def test_llama_server_refusing_the_gateway_is_a_503(keyed_llama, start_gateway):
    gateway = llama_gateway(start_gateway, keyed_llama, "gateway-llama-unkeyed", keyed=False)
    response = httpx.post(f"{gateway}/chat/completions", timeout=30,
                          json={"model": "kimi-k2.5", "messages": PROMPT, "max_tokens": 2})
    assert response.status_code == 503, response.text
    assert "key was refused" in response.json()["error"]["message"]


def test_sglang_with_api_key(start_process, start_gateway, tmp_path_factory):
    sglang = start_sglang(start_process, "sglang-keyed", "--api-key", SGLANG_KEY)
    root = tmp_path_factory.mktemp("keyed-peft")
    legal = write_peft(root / "legal")
    assert httpx.get(f"{sglang}/v1/models", timeout=10).status_code == 401
    gateway = start_gateway({
        "adapter_roots": [str(root)],
        "backends": [{"name": "kt", "kind": "sglang", "url": sglang, "api_key_env": "SGLANG_BACKEND_KEY"}],
        "adapters": [{"name": "legal", "source": str(legal), "backends": ["kt"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]},  # no served_model_name: found via /v1/models
        name="gateway-sglang-keyed", env={"SGLANG_BACKEND_KEY": SGLANG_KEY})
    client = sdk(gateway)
    assert client.chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4).choices
    raw = client.chat.completions.with_raw_response.create(model="legal", messages=PROMPT, max_tokens=4)
    label = raw.headers["x-kimi-adapter"]
    assert label.startswith("legal@")                                      # /load_lora_adapter took the key
    entries = received(sglang)  # the lifecycle's verification probes (completions), then the two chats
    assert [e["body"]["model"] for e in entries if e["path"].endswith("chat/completions")] == ["kimi", f"kimi:{label}"]
    assert {e["body"]["model"] for e in entries if e["path"] == "/v1/completions"} == {"kimi", f"kimi:{label}"}
    assert all(entry["has_authorization"] for entry in entries)


def test_backend_keys_reach_no_log(processes, keyed_llama):
    logs = [Path(p.log_path).read_text(errors="replace") for p in processes if p.log_path]
    assert logs and not any(key in text for text in logs for key in (LLAMA_KEY, SGLANG_KEY))

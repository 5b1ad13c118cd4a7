"""`api_key_env` on self-hosted backends: the key goes as `Authorization: Bearer` on every call the driver
makes, data plane and control plane alike; a backend that refuses it is unavailable, not the client's 401."""
import orjson
import pytest

from backends.base import AdapterFiles, BackendRequest
from backends.errors import BackendUnavailableError
from backends.factory import build_drivers
from backends.llamacpp import LlamaCppDriver, error_from_llamacpp
from backends.sglang import SglangDriver
from gateway.config import GatewayConfig

KEY = "sk-backend-0123456789"
ANSWERS = {
    "/lora-adapters": [{"id": 0, "path": "/x/a.gguf", "scale": 0.0}],
    "/props": {"chat_template": "{{ messages }}"},
    "/v1/models": {"data": [{"id": "kimi"}]},
    "/load_lora_adapter": {"success": True, "loaded_adapters": {"ada": "/x/ada"}},
    "/v1/chat/completions": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]},
    "/health": {},
}


class Answer:
    status, headers = 200, {}

    def __init__(self, body: object) -> None:
        self.body = orjson.dumps(body)

    async def read(self) -> bytes:
        return self.body

    async def aclose(self) -> None:
        pass


class RecordingTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict | None]] = []

    async def request(self, method, path, body=b"", headers=None):
        body = body() if callable(body) else body  # llama.cpp builds its body on the connection
        self.calls.append((method, path, dict(headers) if headers else None))
        return Answer(ANSWERS[path])

    async def probe(self, path, headers=None) -> int:
        self.calls.append(("GET", path, dict(headers) if headers else None))
        return 200

    async def aclose(self) -> None:
        pass


def chat(adapter=None) -> BackendRequest:
    return BackendRequest(path="/v1/chat/completions", body={"messages": [{"role": "user", "content": "hi"}]},
                          model="kimi", route="kimi", adapter=adapter, thinking=True, stream=False)


async def exercise(driver, transport: RecordingTransport, adapter: str | None, files=None) -> set[str]:
    """What the gateway does with a driver: start, health, the lifecycle's list/load/serve, a request."""
    await driver.start()
    await driver.health()
    if adapter is not None:
        await driver.list_adapters(0)
        if driver.dynamic_adapters:
            await driver.load_adapter(0, adapter, files)
        driver.serve(0, {adapter: files})
    reply = await driver.send(chat(adapter))
    await reply.read()
    return {path for _, path, _ in transport.calls}


@pytest.mark.parametrize("kind", ["llamacpp", "sglang"])
async def test_every_call_carries_the_key(kind):
    transport = RecordingTransport()
    if kind == "llamacpp":
        driver, files = LlamaCppDriver("b", [transport], api_key=KEY), AdapterFiles(None, "/x/a.gguf")
        expected = {"/lora-adapters", "/props", "/health", "/v1/chat/completions"}
    else:
        driver, files = SglangDriver("b", [transport], served_model=None, api_key=KEY), AdapterFiles("/x/ada", None)
        expected = {"/v1/models", "/server_info", "/health", "/load_lora_adapter", "/v1/chat/completions"}
    assert await exercise(driver, transport, "ada", files) == expected
    assert all(headers == {"authorization": f"Bearer {KEY}"} for _, _, headers in transport.calls)


async def test_no_key_configured_sends_no_authorization():
    transport = RecordingTransport()
    driver = LlamaCppDriver("b", [transport])
    await exercise(driver, transport, None)
    assert all(not headers for _, _, headers in transport.calls)


@pytest.mark.parametrize("kind", ["llamacpp", "sglang"])
def test_factory_resolves_api_key_env_for_every_kind(kind, tmp_path):
    config = GatewayConfig.model_validate({"state_dir": str(tmp_path), "backends": [
        {"name": "b", "kind": kind, "url": "http://127.0.0.1:9", "api_key_env": "B_KEY"}]})
    driver = build_drivers(config, {"B_KEY": KEY}.get)["b"]
    assert driver.headers() == {"authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("status", [401, 403])
def test_llama_server_refusing_the_gateway_key_is_unavailable(status):
    raw = orjson.dumps({"error": {"code": status, "message": "Invalid API Key", "type": "authentication_error"}})
    error = error_from_llamacpp(status, {}, raw, "b")
    assert isinstance(error, BackendUnavailableError) and "Invalid API Key" not in error.message

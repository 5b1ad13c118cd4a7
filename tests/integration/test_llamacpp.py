"""The gateway in front of a real llama-server, driven by the real openai SDK."""
from __future__ import annotations

import re

import httpx
import openai
import pytest

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import llama_config, sdk

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]


@pytest.fixture(scope="module")
def gateway(llama_server, tiny_models, start_gateway) -> str:
    return start_gateway(llama_config(llama_server, tiny_models), name="gateway-llama")


def greedy(client: openai.OpenAI, model: str, **extra) -> str:
    response = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=16, **extra)
    assert response.model == model
    return response.choices[0].message.content


def streamed(client: openai.OpenAI, model: str) -> str:
    stream = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=16, stream=True)
    parts = []
    for event in stream:
        assert event.model == model
        if event.choices and event.choices[0].delta.content:
            parts.append(event.choices[0].delta.content)
    return "".join(parts)


def test_base_and_adapters_differ_and_repeat(gateway):
    client = sdk(gateway)
    outputs = {model: greedy(client, model) for model in ("kimi-k2.5", "tiny-a", "tiny-b")}
    assert len(set(outputs.values())) == 3, outputs
    for model, text in outputs.items():
        assert text and greedy(client, model) == text


def test_stream_equals_non_stream(gateway):
    client = sdk(gateway)
    for model in ("kimi-k2.5", "tiny-a"):
        assert streamed(client, model) == greedy(client, model)


def test_stream_ends_with_done_and_headers(gateway):
    body = {"model": "tiny-a", "messages": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{gateway}/chat/completions", json=body, timeout=30) as response:
        text = response.read().decode()
    assert response.headers["x-kimi-backend"] == "llama" and response.headers["x-kimi-adapter"].startswith("tiny-a@")
    assert text.endswith("data: [DONE]\n\n")


def last_slot_params(llama_url: str) -> dict:
    slots = httpx.get(f"{llama_url}/slots", timeout=10).json()
    return slots[0]["params"]


def test_recommended_sampling_reaches_llama_server(gateway, llama_server):
    client = sdk(gateway)
    client.chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=2)
    params = last_slot_params(llama_server)
    assert params["temperature"] == pytest.approx(1.0)
    assert params["top_p"] == pytest.approx(0.95)
    assert params["min_p"] == pytest.approx(0.01)
    assert params["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    client.chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=2)
    params = last_slot_params(llama_server)
    assert params["temperature"] == pytest.approx(0.6)
    assert params["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]


def test_experiment_answers_with_a_variant(gateway):
    response = httpx.post(f"{gateway}/chat/completions", timeout=30, json={
        "model": "tiny-ab", "messages": PROMPT, "max_tokens": 4, "temperature": 0, "user": "alice"})
    assert response.status_code == 200 and response.json()["model"] == "tiny-ab"
    variant = response.headers["x-kimi-variant"]
    assert variant in ("tiny-a", "tiny-b") and response.headers["x-kimi-adapter"].partition("@")[0] == variant


def test_completions_endpoint(gateway):
    response = sdk(gateway).completions.create(model="tiny-a", prompt="the blue river", max_tokens=4, temperature=0)
    assert response.model == "tiny-a" and response.choices[0].text


def test_models_lists_routes(gateway):
    assert {m.id for m in sdk(gateway).models.list()} == {"kimi-k2.5", "tiny-a", "tiny-b", "tiny-ab"}


def test_errors(gateway):
    client = sdk(gateway)
    with pytest.raises(openai.NotFoundError):
        greedy(client, "no-such-model")
    malformed = httpx.post(f"{gateway}/chat/completions", content=b"{oops", timeout=10)
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    with pytest.raises(openai.BadRequestError, match="no vision"):
        client.chat.completions.create(model="kimi-k2.5", messages=image, max_tokens=2)


def test_dead_backend_is_a_prompt_503_or_the_next_target(llama_server, tiny_models, start_gateway):
    dead = f"http://127.0.0.1:{free_port()}"
    config = llama_config(llama_server, tiny_models)
    config["backends"] = config["backends"] + [{"name": "dead", "kind": "llamacpp", "url": dead}]
    config["routes"] = [{"name": "kimi-k2.5", "targets": ["dead", "llama"]}, {"name": "only-dead", "targets": ["dead"]}]
    config["exposure"] = {"readyz_details": "public"}
    url = start_gateway(config, name="gateway-dead")
    client = sdk(url)
    with pytest.raises(openai.InternalServerError) as failure:
        client.chat.completions.create(model="only-dead", messages=PROMPT, max_tokens=2)
    assert failure.value.status_code == 503
    raw = client.chat.completions.with_raw_response.create(model="kimi-k2.5", messages=PROMPT, max_tokens=2)
    assert raw.headers["x-kimi-backend"] == "llama"
    ready = httpx.get(url.removesuffix("/v1") + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["backends"] == {"llama": "up", "dead": "down"}


def test_health_ready_and_metrics(gateway):
    base = gateway.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    sdk(gateway).chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=2)
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert re.search(r'kimi_gateway_requests_total\{adapter="tiny-a",backend="llama",code="200",route="tiny-a",'
                     r'version="tiny-a@[0-9a-f]{8}"\} [1-9]', metrics)
    assert 'kimi_gateway_backend_up{backend="llama"} 1.0' in metrics
    assert 'kimi_gateway_adapter_loaded{adapter="tiny-a",backend="llama"} 1.0' in metrics


def test_client_hang_up_cancels_the_upstream_generation(gateway, llama_server):
    """Read one event of a long stream, hang up, and check llama-server stopped well short of max_tokens."""
    import time

    body = {"model": "tiny-a", "messages": PROMPT, "max_tokens": 1900, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{gateway}/chat/completions", json=body, timeout=30) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        slot = httpx.get(f"{llama_server}/slots", timeout=10).json()[0]
        if not slot["is_processing"]:
            break
        time.sleep(0.02)
    assert not slot["is_processing"]
    assert slot["next_token"][0]["n_decoded"] < 1900 if isinstance(slot["next_token"], list) else \
        slot["next_token"]["n_decoded"] < 1900

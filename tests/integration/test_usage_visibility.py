"""The usage the gateway asks for its own token metrics never reaches a client that did not ask for it, on
every backend kind and whatever shape the backend sends usage in (SGLang's `"usage":null` on every chunk,
the hosted API's usage inside the final choice, llama-server's usage chunk); tokens are counted anyway; a
client that asked gets exactly one usage chunk (issue 14 part 5)."""
from __future__ import annotations


import httpx
import orjson
import pytest

from tests.integration.conftest import llama_config, start_moonshot
from tests.integration.test_moonshot import HOSTED_KEY
from tests.integration.test_sglang import start_sglang

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]
ASKED = {"stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def gateways(start_process, start_gateway, llama_server, tiny_models) -> dict[str, str]:
    sglang = start_sglang(start_process, "sglang-usage")
    moonshot = start_moonshot(start_process, "moonshot-usage", HOSTED_KEY)
    return {
        "sglang": start_gateway({"backends": [{"name": "kt", "kind": "sglang", "url": sglang}],
                                 "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}, name="gateway-usage-sglang"),
        "moonshot": start_gateway({"backends": [{"name": "hosted", "kind": "moonshot",
                                                 "url": f"{moonshot}/v1", "api_key_env": "MOONSHOT_KEY",
                                                 "models": {"kimi-k2.5": "kimi-k2.6"}}],
                                   "routes": [{"name": "kimi-k2.5", "targets": ["hosted"]}]},
                                  name="gateway-usage-moonshot", env={"MOONSHOT_KEY": HOSTED_KEY}),
        "llamacpp": start_gateway(llama_config(llama_server, tiny_models), name="gateway-usage-llama"),
    }


BACKENDS = ["sglang", "moonshot", "llamacpp"]
ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}


def body_for(endpoint: str, **extra) -> dict:
    base = {"model": "kimi-k2.5", "max_tokens": 6, "temperature": 0, **extra}
    return {**base, "messages": PROMPT} if endpoint == "chat" else {**base, "prompt": "the blue river"}


def completion_tokens_counted(gateway: str) -> float:
    # summed over routes: series known from config exist at zero too
    text = httpx.get(f"{gateway.removesuffix('/v1')}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kimi_gateway_tokens_total{") and 'kind="completion"' in line)


def stream(gateway: str, endpoint: str, **extra) -> list[dict]:
    with httpx.stream("POST", gateway + ENDPOINTS[endpoint], json=body_for(endpoint, stream=True, **extra),
                      timeout=60) as response:
        assert response.status_code == 200
        text = response.read().decode()
    assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
    return [orjson.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def usages(chunks: list[dict]) -> list[dict]:
    """Every usage object a client sees in these chunks: at the top level or inside a choice."""
    found = [c["usage"] for c in chunks if c.get("usage")]
    return found + [choice["usage"] for c in chunks for choice in c.get("choices") or () if choice.get("usage")]


def cases() -> list:
    return [pytest.param(backend, endpoint, id=f"{backend}-{endpoint}") for backend in BACKENDS
            for endpoint in ENDPOINTS if not (backend == "moonshot" and endpoint == "completions")]


@pytest.mark.parametrize("backend, endpoint", cases())
def test_a_stream_that_did_not_ask_shows_no_usage_but_is_counted(gateways, backend, endpoint):
    gateway = gateways[backend]
    before = completion_tokens_counted(gateway)
    chunks = stream(gateway, endpoint)
    assert usages(chunks) == [] and all(c["choices"] for c in chunks)
    counted = completion_tokens_counted(gateway) - before
    assert 0 < counted <= 6 and (backend == "llamacpp" or counted == 6)


@pytest.mark.parametrize("backend, endpoint", cases())
def test_a_stream_that_asked_gets_exactly_one_usage_chunk(gateways, backend, endpoint):
    gateway = gateways[backend]
    before = completion_tokens_counted(gateway)
    chunks = stream(gateway, endpoint, **ASKED)
    shown = usages(chunks)
    assert len(shown) == 1 and chunks[-1]["choices"] == [] and chunks[-1]["usage"] == shown[0]
    assert chunks[-1]["model"] == "kimi-k2.5"
    assert completion_tokens_counted(gateway) - before == shown[0]["completion_tokens"] > 0


@pytest.mark.parametrize("backend, endpoint", cases())
def test_a_non_stream_reply_has_its_usage_once_at_the_top_level(gateways, backend, endpoint):
    gateway = gateways[backend]
    before = completion_tokens_counted(gateway)
    response = httpx.post(gateway + ENDPOINTS[endpoint], json=body_for(endpoint), timeout=60)
    assert response.status_code == 200
    doc = response.json()
    assert usages([doc]) == [doc["usage"]]
    assert completion_tokens_counted(gateway) - before == doc["usage"]["completion_tokens"] > 0

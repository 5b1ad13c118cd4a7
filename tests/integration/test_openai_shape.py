"""Every answer OpenAI-exact, from the real gateway process in front of a real llama-server (base model and an
adapter), the SGLang emulator and the Moonshot emulator: chat and completions, whole and streamed, /v1/models
and error bodies, each validated against OpenAI's own response schemas (tests/openai_spec); one id and one
`created` per stream; x-request-id kept and handed to the backend; what a backend cannot serve refused by name."""
from __future__ import annotations

import re

import httpx
import orjson
import pytest

from tests.integration.conftest import start_moonshot
from tests.integration.test_sglang import start_sglang
from tests.openai_spec import assert_conforms

CHAT, COMPLETIONS = "/chat/completions", "/completions"
MESSAGES = [{"role": "user", "content": "Tell me about the blue river"}]
HOSTED_KEY = "sk-hosted-shape-test-123"
ID_PREFIX = {CHAT: "chatcmpl-", COMPLETIONS: "cmpl-"}


@pytest.fixture(scope="module")
def sglang(start_process) -> str:
    return start_sglang(start_process, "sglang-shape")


@pytest.fixture(scope="module")
def moonshot(start_process) -> str:
    return start_moonshot(start_process, "moonshot-shape", HOSTED_KEY)


@pytest.fixture(scope="module")
def gateway(llama_server, tiny_models, sglang, moonshot, start_gateway) -> str:
    return start_gateway({
        "adapter_roots": [str(tiny_models.model.parent)],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": llama_server},
                     {"name": "kt", "kind": "sglang", "url": sglang},
                     {"name": "hosted", "kind": "moonshot", "url": f"{moonshot}/v1", "api_key_env": "SHAPE_HOSTED_KEY",
                      "models": {"hosted": "kimi-k2.6"}}],
        "adapters": [{"name": "tiny-a", "gguf": str(tiny_models.lora_a), "backends": ["llama"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}, {"name": "kt", "targets": ["kt"]},
                   {"name": "hosted", "targets": ["hosted"]}],
    }, name="gateway-shape", env={"SHAPE_HOSTED_KEY": HOSTED_KEY})


def body_for(path: str, model: str, **extra) -> dict:
    words = {"messages": MESSAGES} if path == CHAT else {"prompt": "the blue river"}
    return {"model": model, "max_tokens": 6, **words, **extra}


def post(gateway: str, path: str, body: dict, request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    return httpx.post(gateway + path, json=body, headers=headers, timeout=60)


def stream_chunks(text: str) -> list[dict]:
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    return [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]


CASES = [("kimi-k2.5", CHAT), ("tiny-a", CHAT), ("kimi-k2.5", COMPLETIONS), ("tiny-a", COMPLETIONS),
         ("kt", CHAT), ("kt", COMPLETIONS), ("hosted", CHAT)]


@pytest.mark.parametrize("model, path", CASES)
def test_whole_replies_are_openai_exact(gateway, model, path):
    response = post(gateway, path, body_for(path, model), request_id=f"shape-{model}-whole")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert_conforms("CreateChatCompletionResponse" if path == CHAT else "CreateCompletionResponse", doc)
    assert doc["id"].startswith(ID_PREFIX[path]) and doc["model"] == model
    assert "timings" not in doc and "b1-" not in response.text and "metadata" not in doc
    assert response.headers["x-request-id"] == f"shape-{model}-whole"


@pytest.mark.parametrize("model, path", CASES)
@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
def test_streams_are_openai_exact_with_one_id_and_one_created(gateway, model, path, usage):
    extra = {"stream": True, **({"stream_options": {"include_usage": True}} if usage else {})}
    response = post(gateway, path, body_for(path, model, **extra))
    assert response.status_code == 200, response.text
    chunks = stream_chunks(response.text)
    for chunk in chunks:
        if path == CHAT:
            assert_conforms("CreateChatCompletionStreamResponse", chunk)
        else:
            assert_conforms("CreateCompletionResponse", chunk, streamed=True)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith(ID_PREFIX[path])
    assert len({c["created"] for c in chunks}) == 1
    assert "timings" not in response.text and "b1-" not in response.text
    if usage:  # (llama-server's completions stream reports usage on its last chunk even unasked: left as is)
        assert chunks[-1]["usage"]["total_tokens"] > 0


def test_models_and_errors_are_openai_exact(gateway):
    models = httpx.get(f"{gateway}/models", timeout=10)
    assert_conforms("ListModelsResponse", models.json())
    assert_conforms("Model", httpx.get(f"{gateway}/models/kt", timeout=10).json())
    errors = [httpx.get(f"{gateway}/models/nope", timeout=10),
              post(gateway, CHAT, body_for(CHAT, "nope")),
              post(gateway, CHAT, body_for(CHAT, "kt", temperature=3)),
              post(gateway, CHAT, body_for(CHAT, "hosted", n=2)),
              httpx.post(f"{gateway}/chat/completions", content=b"{oops", timeout=10)]
    for response in errors:
        assert 400 <= response.status_code < 500 and response.headers["x-request-id"], response.text
        assert_conforms("ErrorResponse", response.json())
    assert errors[2].json()["error"] == {
        "message": "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.",
        "type": "invalid_request_error", "param": "temperature", "code": "decimal_above_max_value"}


@pytest.mark.parametrize("emulator", ["sglang", "moonshot"])
def test_the_request_id_reaches_the_backend(gateway, request, emulator):
    url = request.getfixturevalue(emulator)
    model = "kt" if emulator == "sglang" else "hosted"
    response = post(gateway, CHAT, body_for(CHAT, model), request_id="lb-req:42.a_b")
    assert response.headers["x-request-id"] == "lb-req:42.a_b"
    assert httpx.get(f"{url}/_emulator/requests", timeout=10).json()[-1]["headers"]["x-request-id"] == "lb-req:42.a_b"
    minted = post(gateway, CHAT, body_for(CHAT, model), request_id="not ok!").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24}", minted)
    assert httpx.get(f"{url}/_emulator/requests", timeout=10).json()[-1]["headers"]["x-request-id"] == minted


@pytest.mark.parametrize("fields, param", [({"n": 2}, "n"), ({"logprobs": True, "top_logprobs": 2}, "logprobs")])
def test_hosted_refuses_what_it_cannot_serve_by_name(gateway, moonshot, fields, param):
    before = len(httpx.get(f"{moonshot}/_emulator/requests", timeout=10).json())
    response = post(gateway, CHAT, body_for(CHAT, "hosted", **fields))
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert len(httpx.get(f"{moonshot}/_emulator/requests", timeout=10).json()) == before


def test_hosted_penalties_are_adjusted_said_and_counted(gateway, moonshot):
    response = post(gateway, CHAT, body_for(CHAT, "hosted", presence_penalty=0.5))
    assert response.status_code == 200, response.text
    assert response.headers["x-kimi-adjusted"] == "presence_penalty=0"
    assert "presence_penalty" not in httpx.get(f"{moonshot}/_emulator/requests", timeout=10).json()[-1]["body"]
    metrics = httpx.get(gateway.removesuffix("/v1") + "/metrics", timeout=10).text
    assert re.search(r'kimi_gateway_request_adjustments_total\{adjustment="presence_penalty=0",route="hosted"\} '
                     r'[1-9]', metrics), metrics


def test_self_hosted_serve_n_and_logprobs_and_best_of_equal_to_n(gateway, sglang):
    response = post(gateway, CHAT, body_for(CHAT, "kt", n=2, logprobs=True, top_logprobs=2))
    assert response.status_code == 200, response.text
    sent = httpx.get(f"{sglang}/_emulator/requests", timeout=10).json()[-1]["body"]
    assert (sent["n"], sent["logprobs"], sent["top_logprobs"]) == (2, True, 2)
    assert post(gateway, COMPLETIONS, body_for(COMPLETIONS, "kimi-k2.5", best_of=1)).status_code == 200
    ignored = post(gateway, COMPLETIONS, body_for(COMPLETIONS, "kimi-k2.5", best_of=3))  # llama-server ignores it
    assert ignored.status_code == 400 and ignored.json()["error"]["param"] == "best_of", ignored.text
    logprobs = post(gateway, CHAT, body_for(CHAT, "kimi-k2.5", logprobs=True, top_logprobs=2))
    assert logprobs.status_code == 200 and logprobs.json()["choices"][0]["logprobs"]["content"], logprobs.text

"""The gateway in front of the Moonshot emulator (reference/moonshot-api.md), driven by the openai SDK."""
from __future__ import annotations


import httpx
import openai
import orjson
import pytest

from tests.integration.conftest import sdk, start_moonshot

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]
HOSTED_KEY = "sk-hosted-test-key-123"


@pytest.fixture(scope="module")
def moonshot(start_process) -> str:
    return start_moonshot(start_process, "moonshot", HOSTED_KEY)


@pytest.fixture(scope="module")
def gateway(moonshot, start_gateway) -> str:
    return start_gateway({
        "backends": [{"name": "hosted", "kind": "moonshot", "url": f"{moonshot}/v1", "api_key_env": "MOONSHOT_KEY",
                      "models": {"kimi-k2.5": "kimi-k2.6"}, "retry": {"attempts": 2, "max_retry_after_s": 2}}],
        "routes": [{"name": "kimi-k2.5", "targets": ["hosted"]}, {"name": "kimi-k3", "targets": ["hosted"]},
                   {"name": "retired", "targets": ["hosted"]}],
    }, name="gateway-moonshot", env={"MOONSHOT_KEY": HOSTED_KEY})


def received(emulator: str) -> list[dict]:
    return httpx.get(f"{emulator}/_emulator/requests", timeout=10).json()


def test_model_mapped_sampling_stripped_thinking_top_level(gateway, moonshot):
    """The emulator answers 400 to any temperature but the mode's fixed one: the gateway must strip it."""
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="kimi-k2.5", messages=PROMPT, max_tokens=8,
                                                                 temperature=0.3, top_p=0.5)
    response = raw.parse()
    assert response.model == "kimi-k2.5"
    assert raw.headers["x-kimi-adjusted"] == "model=kimi-k2.6,temperature=1,top_p=0.95"  # the fixed values, said
    assert getattr(response.choices[0].message, "reasoning_content", None)
    entry = received(moonshot)[-1]
    body = entry["body"]
    assert entry["has_authorization"]
    assert body["model"] == "kimi-k2.6" and body["thinking"] == {"type": "enabled", "keep": "all"}
    assert not {"temperature", "top_p", "min_p", "chat_template_kwargs"} & body.keys()


def test_instant_mode_is_the_hosted_thinking_switch(gateway, moonshot):
    sdk(gateway).chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4,
                                         extra_body={"chat_template_kwargs": {"thinking": False}})
    assert received(moonshot)[-1]["body"]["thinking"] == {"type": "disabled"}


def test_hosted_fields_it_cannot_take_are_refused_by_name(gateway):
    with pytest.raises(openai.BadRequestError, match="min_p"):
        sdk(gateway).chat.completions.create(model="kimi-k2.5", messages=PROMPT, max_tokens=4,
                                             extra_body={"min_p": 0.05})


def test_stream_reasoning_then_content_ends_with_done(gateway):
    body = {"model": "kimi-k2.5", "messages": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{gateway}/chat/completions", json=body, timeout=30) as response:
        text = response.read().decode()
    assert '"model":"kimi-k2.5"' in text and "kimi-k2.6" not in text
    assert text.endswith("data: [DONE]\n\n")
    kinds = []
    for event in text.split("\n\n"):
        if event.startswith("data: {"):
            for choice in orjson.loads(event[6:])["choices"]:
                delta = choice.get("delta", {})
                kinds += ["reasoning"] * bool(delta.get("reasoning_content")) + ["content"] * bool(delta.get("content"))
    assert "reasoning" in kinds and "content" in kinds
    assert kinds.index("content") > len(kinds) - 1 - kinds[::-1].index("reasoning")


def test_overloaded_429_with_retry_after_is_retried(gateway, moonshot):
    httpx.post(f"{moonshot}/_emulator/faults", json={"status": 429, "count": 1}, timeout=10).raise_for_status()
    before = len(received(moonshot))
    response = sdk(gateway).chat.completions.create(model="kimi-k3", messages=PROMPT, max_tokens=4)
    assert response.model == "kimi-k3"
    assert len(received(moonshot)) - before == 2


def test_retired_model_is_a_clear_503(gateway):
    with pytest.raises(openai.InternalServerError) as failure:
        sdk(gateway).chat.completions.create(model="retired", messages=PROMPT, max_tokens=4)
    assert failure.value.status_code == 503
    assert "not available" in failure.value.message


def test_the_hosted_key_never_reaches_clients(gateway, moonshot):
    httpx.post(f"{moonshot}/_emulator/faults", json={"status": 401, "count": 3}, timeout=10).raise_for_status()
    response = httpx.post(f"{gateway}/chat/completions", json={"model": "kimi-k3", "messages": PROMPT}, timeout=30)
    assert response.status_code == 503 and HOSTED_KEY not in response.text
    httpx.post(f"{moonshot}/_emulator/reset", timeout=10)

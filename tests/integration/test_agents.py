"""Agent traffic through every backend: two-turn tool loops with thinking on, the hosted thinking rules, the
reasoning memory, streamed tool-call deltas, and usage for metrics. The client drops `reasoning_content`
from its history, as common frameworks do."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.integration.conftest import sdk, start_moonshot
from tests.integration.test_moonshot import HOSTED_KEY
from tests.integration.test_sglang import start_sglang

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris? call get_weather"}]


@pytest.fixture(scope="module")
def moonshot(start_process) -> str:
    return start_moonshot(start_process, "moonshot-agents", HOSTED_KEY) + "/v1"


def hosted_gateway(start_gateway, moonshot: str, name: str, **extra) -> str:
    route = {"name": "kimi-k2.5", "targets": ["hosted"], **extra.pop("route", {})}
    return start_gateway({"backends": [{"name": "hosted", "kind": "moonshot", "url": moonshot,
                                        "api_key_env": "MOONSHOT_KEY", "models": {"kimi-k2.5": "kimi-k2.6"}}],
                          "routes": [route], **extra}, name=name, env={"MOONSHOT_KEY": HOSTED_KEY})


@pytest.fixture(scope="module")
def hosted(start_gateway, moonshot) -> str:
    return hosted_gateway(start_gateway, moonshot, "gateway-agents-hosted")


@pytest.fixture(scope="module")
def sglang_gateway(start_process, start_gateway) -> str:
    sglang = start_sglang(start_process, "sglang-agents")
    return start_gateway({"backends": [{"name": "kt", "kind": "sglang", "url": sglang}],
                          "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}, name="gateway-agents-sglang")


def first_turn(client: openai.OpenAI, stream: bool, user: str = "agent-1") -> dict:
    """Turn one, as a framework keeps it: the assistant message without reasoning_content. The gateways here
    are open (no client keys), where the reasoning memory is per `user`."""
    if not stream:
        message = client.chat.completions.create(model="kimi-k2.5", messages=ASK, tools=TOOLS, user=user,
                                                 max_tokens=64).choices[0].message
        calls = [call.model_dump() for call in message.tool_calls]
        assert getattr(message, "reasoning_content", None)
        return {"role": "assistant", "content": message.content, "tool_calls": calls}
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model="kimi-k2.5", messages=ASK, tools=TOOLS, max_tokens=64,
                                                stream=True, user=user):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                entry = calls.setdefault(delta.index, {"id": "", "type": "function",
                                                       "function": {"name": "", "arguments": ""}})
                entry["id"] = delta.id or entry["id"]
                entry["function"]["name"] += (delta.function.name or "") if delta.function else ""
                entry["function"]["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert finish == "tool_calls"
    return {"role": "assistant", "content": None, "tool_calls": [calls[i] for i in sorted(calls)]}


def tool_loop(client: openai.OpenAI, stream: bool) -> str:
    assistant = first_turn(client, stream)
    result = {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": '{"temp_c": 21}'}
    history = ASK + [assistant, result]
    if not stream:
        return client.chat.completions.create(model="kimi-k2.5", messages=history, tools=TOOLS, user="agent-1",
                                              max_tokens=16).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="kimi-k2.5", messages=history, tools=TOOLS, max_tokens=16, stream=True, user="agent-1") if c.choices]
    return "".join(parts)


@pytest.mark.parametrize("stream", [False, True])
def test_memory_fixes_the_dropped_reasoning_loop_on_the_hosted_api(hosted, stream):
    assert tool_loop(sdk(hosted), stream)
    metrics = httpx.get(hosted.removesuffix("/v1") + "/metrics", timeout=10).text
    assert re.search(r'kimi_gateway_reasoning_memory_total\{result="restored",route="kimi-k2.5"\} [1-9]', metrics)


def test_open_gateway_memory_is_per_user_never_shared(hosted):
    """Alice's remembered reasoning goes back into Alice's history only: Bob replaying her exact turn, or a
    client sending no `user`, gets nothing of it (so the default rule turns thinking off for them)."""
    client = sdk(hosted)
    assistant = first_turn(client, stream=False, user="alice")
    history = ASK + [assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "21"}]

    def replay(**user) -> httpx.Headers:
        return client.chat.completions.with_raw_response.create(model="kimi-k2.5", messages=history, tools=TOOLS,
                                                                max_tokens=8, **user).headers
    assert replay(user="bob").get("x-kimi-adjusted") == "thinking=off:reasoning_missing"
    assert replay().get("x-kimi-adjusted") == "thinking=off:reasoning_missing"
    assert "x-kimi-adjusted" not in replay(user="alice")


def test_without_memory_the_hosted_api_refuses_the_same_loop(start_gateway, moonshot):
    """Shows the emulator is faithful and that the memory is what fixed the loop."""
    url = hosted_gateway(start_gateway, moonshot, "gateway-agents-nomemory", reasoning_memory={"enabled": False},
                         route={"agent": {"missing_reasoning": "forward"}})
    with pytest.raises(openai.BadRequestError, match="reasoning_content is missing"):
        tool_loop(sdk(url), stream=False)


def test_without_memory_the_default_rule_turns_thinking_off(start_gateway, moonshot):
    url = hosted_gateway(start_gateway, moonshot, "gateway-agents-instant", reasoning_memory={"enabled": False})
    client = sdk(url)
    assistant = first_turn(client, stream=False)
    history = ASK + [assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "21"}]
    raw = client.chat.completions.with_raw_response.create(model="kimi-k2.5", messages=history, tools=TOOLS,
                                                           max_tokens=8)
    assert raw.headers["x-kimi-adjusted"] == "thinking=off:reasoning_missing"


def test_forced_tool_choice_with_thinking_is_downgraded(hosted):
    raw = sdk(hosted).chat.completions.with_raw_response.create(
        model="kimi-k2.5", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=32)
    assert raw.parse().choices[0].message.tool_calls
    assert raw.headers["x-kimi-adjusted"] == "tool_choice=auto"
    metrics = httpx.get(hosted.removesuffix("/v1") + "/metrics", timeout=10).text
    assert 'kimi_gateway_request_adjustments_total{adjustment="tool_choice=auto",route="kimi-k2.5"} 1.0' in metrics


def test_forced_tool_choice_reject_rule(start_gateway, moonshot):
    url = hosted_gateway(start_gateway, moonshot, "gateway-agents-reject",
                         route={"agent": {"forced_tool_choice": "reject"}})
    with pytest.raises(openai.BadRequestError, match="route rule: reject"):
        sdk(url).chat.completions.create(model="kimi-k2.5", messages=ASK, tools=TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})


def test_hosted_tool_limits_are_checked_before_sending(hosted):
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    with pytest.raises(openai.BadRequestError, match="at most 128 tools"):
        sdk(hosted).chat.completions.create(model="kimi-k2.5", messages=ASK, tools=many)
    with pytest.raises(openai.BadRequestError, match="does not match"):
        sdk(hosted).chat.completions.create(model="kimi-k2.5", messages=ASK,
                                            tools=[{"type": "function", "function": {"name": "9lives"}}])
    with pytest.raises(openai.BadRequestError, match="'functions' is the deprecated form"):
        sdk(hosted).chat.completions.create(model="kimi-k2.5", messages=ASK, functions=[{"name": "f"}])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_loop_through_sglang(sglang_gateway, stream):
    assert tool_loop(sdk(sglang_gateway), stream)


@pytest.mark.parametrize("gateway_fixture", ["hosted", "sglang_gateway"])
def test_streamed_arguments_equal_non_streamed(request, gateway_fixture):
    client = sdk(request.getfixturevalue(gateway_fixture))
    whole = first_turn(client, stream=False)["tool_calls"]
    streamed = first_turn(client, stream=True)["tool_calls"]
    assert [c["function"]["arguments"] for c in streamed] == [c["function"]["arguments"] for c in whole]
    assert json.loads(streamed[0]["function"]["arguments"])["city"]
    assert streamed[0]["id"] == whole[0]["id"] and streamed[0]["function"]["name"] == "get_weather"


def test_stream_usage_is_counted_but_not_shown(sglang_gateway):
    base = sglang_gateway.removesuffix("/v1")

    def completion_tokens() -> float:
        # summed over routes: series known from config exist at zero too
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kimi_gateway_tokens_total{") and 'kind="completion"' in line)

    before = completion_tokens()
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{sglang_gateway}/chat/completions", json=body, timeout=30) as response:
        text = response.read().decode()
    chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert not any(c.get("usage") for c in chunks)  # SGLang's "usage":null on every chunk is not usage
    assert text.endswith("data: [DONE]\n\n")
    assert completion_tokens() - before == 6
    with httpx.stream("POST", f"{sglang_gateway}/chat/completions", timeout=30,
                      json={**body, "stream_options": {"include_usage": True}}) as response:
        assert '"choices":[],' in response.read().decode().replace(" ", "")

"""The Moonshot emulator's per-generation rules (moonshot-api.md §0-§2, §8): each as strict as reference/."""
from __future__ import annotations

import json

import pytest

from tests.emulators.moonshot import MoonshotOptions, create_moonshot_app, parse_generations
from tests.unit.emulators.helpers import WEATHER_TOOL, client_for, sse_payloads, user

KEY = {"Authorization": "Bearer k"}
MODELS = ("kimi-k2.5", "kimi-k2.6", "kimi-k2.7-code", "kimi-k3", "custom-code")
OPTIONS = MoonshotOptions(api_key="k", models=MODELS, generations={"custom-code": "k2.7-code"})
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
LOOP = user("weather? call get_weather") + [
    {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "I should look it up"},
    {"role": "tool", "tool_call_id": CALL["id"], "content": "21"}]
KEEP = {"type": "enabled", "keep": "all"}


async def post(body: dict, path: str = "/v1/chat/completions"):
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        response = await client.post(path, json=body, headers=KEY)
        replays = (await client.get("/_emulator/reasoning")).json()
    return response, replays


@pytest.mark.parametrize("model", MODELS)
async def test_thinking_and_reasoning_effort_together_is_a_400_everywhere(model):
    response, _ = await post({"model": model, "messages": user("hi"), "thinking": {"type": "enabled"},
                              "reasoning_effort": "high"})
    assert response.status_code == 400 and "cannot specify both" in response.json()["error"]["message"]


@pytest.mark.parametrize("thinking, replay", [({"type": "enabled"}, "discarded"), (None, "discarded"),
                                              (KEEP, "kept")])
async def test_k2_6_discards_replayed_reasoning_without_keep_all_and_records_it(thinking, replay):
    body = {"model": "kimi-k2.6", "messages": LOOP, "tools": [WEATHER_TOOL]}
    if thinking is not None:
        body["thinking"] = thinking
    response, replays = await post(body)
    assert response.status_code == 200
    assert replays == [{"model": "kimi-k2.6", "generation": "k2.6", "reasoning": replay}]


async def test_k2_5_keeps_replayed_reasoning_and_refuses_keep():
    response, replays = await post({"model": "kimi-k2.5", "messages": LOOP, "thinking": {"type": "enabled"}})
    assert response.status_code == 200 and replays[0]["reasoning"] == "kept"
    response, _ = await post({"model": "kimi-k2.5", "messages": LOOP, "thinking": KEEP})
    assert response.status_code == 400


@pytest.mark.parametrize("reasoning", ["", None])
async def test_k2_6_reads_an_empty_reasoning_as_missing(reasoning):
    history = [dict(m) for m in LOOP]
    history[1]["reasoning_content"] = reasoning
    response, _ = await post({"model": "kimi-k2.6", "messages": history, "thinking": KEEP})
    assert response.status_code == 400 and "reasoning_content is missing" in response.json()["error"]["message"]


@pytest.mark.parametrize("model", ["kimi-k2.7-code", "custom-code"])
@pytest.mark.parametrize("thinking, status", [(KEEP, 200), (None, 200), ({"type": "enabled"}, 400),
                                              ({"type": "disabled"}, 400), ({"type": "disabled", "keep": "all"}, 400)])
async def test_k2_7_code_accepts_only_enabled_keep_all(model, thinking, status):
    body = {"model": model, "messages": user("hi")}
    if thinking is not None:
        body["thinking"] = thinking
    assert (await post(body))[0].status_code == status


async def test_k3_tool_call_ids_and_k2_ids():
    ask = {"messages": user("call get_weather"), "tools": [WEATHER_TOOL], "max_tokens": 64}
    k3, _ = await post({"model": "kimi-k3", **ask})
    k2, _ = await post({"model": "kimi-k2.6", **ask})
    assert k3.json()["choices"][0]["message"]["tool_calls"][0]["id"] == "get_weather_0"
    assert k2.json()["choices"][0]["message"]["tool_calls"][0]["id"] == "functions.get_weather:0"


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_inside_a_tool_call_ends_with_length_and_a_partial_call(stream):
    body = {"model": "kimi-k2.6", "messages": user("call get_weather"), "tools": [WEATHER_TOOL],
            "max_tokens": 4, "stream": stream}
    response, _ = await post(body)
    if stream:
        payloads = [p for p in sse_payloads(response.text) if isinstance(p, dict)]
        finish = [c["finish_reason"] for p in payloads for c in p["choices"] if c.get("finish_reason")]
        arguments = "".join(d["function"]["arguments"] for p in payloads for c in p["choices"]
                            for d in c["delta"].get("tool_calls") or ())
    else:
        choice = response.json()["choices"][0]
        finish, arguments = [choice["finish_reason"]], choice["message"]["tool_calls"][0]["function"]["arguments"]
    assert finish == ["length"] and arguments
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments)


def test_generation_flag():
    assert parse_generations(["a=k3", "b=k2.6"]) == {"a": "k3", "b": "k2.6"}
    with pytest.raises(SystemExit, match="GEN one of"):
        parse_generations(["a=k9"])

"""One K2.5-shaped client against every Kimi generation (reference/moonshot-api.md §0-§2, §8), through the real
gateway process: the openai SDK, thinking on, reasoning dropped from the history as frameworks do. Hosted
targets are the Moonshot emulator's K2.5, K2.6 and K3 (each with its own generation's rules); self-hosted
ones the SGLang emulator and the real llama-server. Also the hosted model lifecycle: a retired, unmapped id is
a 404 naming the retirement, a mapped one says so in x-kimi-adjusted, and a coming retirement is warned about."""
from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import httpx
import openai
import pytest

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT, sdk
from tests.integration.test_sglang import start_sglang

KEY = "sk-generations-test-123"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris? call get_weather"}]
IMPORTED_ON = dt.datetime.now(dt.timezone.utc).date()
SOON = (IMPORTED_ON + dt.timedelta(days=20)).isoformat()


def days_to_soon() -> set[int]:
    """Days from "today" to SOON as the gateway may have counted them: 20, or 19 when a UTC midnight fell between
    this module's import and the gateway's count (seen once in CI, at 00:05 UTC)."""
    today = dt.datetime.now(dt.timezone.utc).date()
    return {(dt.date.fromisoformat(SOON) - day).days for day in (IMPORTED_ON, today)}
TARGETS = {"on-k25": "kimi-k2.5", "on-k26": "kimi-k2.6", "on-k3": "kimi-k3"}


@pytest.fixture(scope="module")
def moonshot(start_process) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "tests.emulators.moonshot", "--port", str(port), "--api-key", KEY,
            "--models", "kimi-k2.5,kimi-k2.6,kimi-k3,team-k3", "--generation", "team-k3=k3"]
    start_process("moonshot-generations", argv, f"http://127.0.0.1:{port}/_emulator/requests",
                  env={"PYTHONPATH": str(ROOT)})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gateway(start_gateway, moonshot) -> str:
    hosted = {"kind": "moonshot", "url": f"{moonshot}/v1", "api_key_env": "MOONSHOT_KEY"}
    config = {
        "backends": [
            {"name": "hosted", **hosted, "models": {"kimi-k2.5": "kimi-k2.6", "on-k26": "kimi-k2.6",
                                                   "on-k3": "kimi-k3", "team": "team-k3"},
             "generations": {"team-k3": "k3"}, "retirements": {"kimi-k2.6": SOON}},
            # a deployment that still serves K2.5 (its sunset moved by configuration)
            {"name": "private", **hosted, "models": {"on-k25": "kimi-k2.5"}, "retirements": {"kimi-k2.5": "2099-12-31"}},
        ],
        "routes": [{"name": "kimi-k2.5", "targets": ["hosted"]}, {"name": "on-k25", "targets": ["private"]},
                   {"name": "on-k26", "targets": ["hosted"]}, {"name": "on-k3", "targets": ["hosted"]},
                   {"name": "team", "targets": ["hosted"]}, {"name": "moonshot-v1-8k", "targets": ["hosted"]},
                   {"name": "kimi-k2-thinking", "targets": ["hosted", "private"]}],
    }
    return start_gateway(config, name="gateway-generations", env={"MOONSHOT_KEY": KEY})


def replays(moonshot: str) -> list[dict]:
    return httpx.get(f"{moonshot}/_emulator/reasoning", timeout=10).json()


def received(emulator: str) -> list[dict]:
    return httpx.get(f"{emulator}/_emulator/requests", timeout=10).json()


def turn_one(client: openai.OpenAI, model: str, user: str, stream: bool) -> dict:
    """The assistant turn as a framework keeps it: tool calls, no reasoning."""
    if not stream:
        message = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, user=user,
                                                 max_tokens=64).choices[0].message
        assert getattr(message, "reasoning_content", None)
        return {"role": "assistant", "content": message.content, "tool_calls": [c.model_dump() for c in message.tool_calls]}
    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, user=user, max_tokens=64,
                                                stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            entry = calls.setdefault(delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            entry["id"] = delta.id or entry["id"]
            entry["function"]["name"] += delta.function.name or ""
            entry["function"]["arguments"] += delta.function.arguments or ""
    return {"role": "assistant", "content": None, "tool_calls": [calls[i] for i in sorted(calls)]}


def tool_loop(client: openai.OpenAI, model: str, user: str, stream: bool = False):
    assistant = turn_one(client, model, user, stream)
    history = ASK + [assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "21"}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=history, tools=TOOLS, user=user,
                                                           max_tokens=16)
    return assistant, raw


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", sorted(TARGETS))
def test_a_k2_5_client_tool_loop_succeeds_on_every_hosted_generation(gateway, moonshot, route, stream):
    assistant, raw = tool_loop(sdk(gateway), route, user=f"agent-{route}-{stream}", stream=stream)
    assert raw.parse().choices[0].message.content
    assert "x-kimi-adjusted" not in raw.headers  # reasoning came back from memory: nothing had to give way
    ids = {"on-k3": "get_weather_0"}.get(route, "functions.get_weather:0")
    assert assistant["tool_calls"][0]["id"] == ids  # each generation's own id, kept through memory and replay
    sent = received(moonshot)[-1]["body"]
    assert sent["model"] == TARGETS[route]
    assert sent["messages"][1]["reasoning_content"] and sent["messages"][1]["tool_calls"][0]["id"] == ids
    assert not ("thinking" in sent and "reasoning_effort" in sent)
    if route == "on-k26":
        assert sent["thinking"] == {"type": "enabled", "keep": "all"}
    assert replays(moonshot)[-1] == {"model": TARGETS[route], "generation": route[3:].replace("k25", "k2.5")
                                     .replace("k26", "k2.6"), "reasoning": "kept"}


def test_k3_takes_the_clients_effort_and_no_thinking_field(gateway, moonshot):
    sdk(gateway).chat.completions.create(model="team", messages=ASK, max_tokens=8, reasoning_effort="medium",
                                         extra_body={"thinking": {"type": "enabled"}})
    sent = received(moonshot)[-1]["body"]
    assert sent["model"] == "team-k3" and sent["reasoning_effort"] == "high" and "thinking" not in sent


def test_instant_mode_is_refused_on_a_target_that_always_thinks(gateway):
    with pytest.raises(openai.BadRequestError, match="always thinks"):
        sdk(gateway).chat.completions.create(model="on-k3", messages=ASK, max_tokens=8,
                                             extra_body={"thinking": {"type": "disabled"}})


def test_reasoning_under_vllms_name_is_served_on_the_hosted_api(gateway, moonshot):
    """No `user` on an open gateway: no memory, so only the mapped field can satisfy K2.6's rule."""
    assistant = turn_one(sdk(gateway), "on-k26", "alias-turn-one", False)
    history = ASK + [{**assistant, "reasoning": "I will look the weather up."},
                     {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "21"}]
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="on-k26", messages=history, tools=TOOLS,
                                                                 max_tokens=8)
    assert raw.status_code == 200 and "x-kimi-adjusted" not in raw.headers
    sent = received(moonshot)[-1]["body"]["messages"][1]
    assert sent["reasoning_content"] == "I will look the weather up." and "reasoning" not in sent


def test_reasoning_under_vllms_name_is_served_on_sglang(start_process, start_gateway):
    sglang = start_sglang(start_process, "sglang-generations")
    url = start_gateway({"backends": [{"name": "kt", "kind": "sglang", "url": sglang, "generation": "k2.6"}],
                         "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}, name="gateway-generations-sglang")
    history = ASK + [{"role": "assistant", "content": None, "reasoning": "look it up",
                      "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "21"}]
    assert sdk(url).chat.completions.create(model="kimi-k2.5", messages=history, tools=TOOLS, max_tokens=8)
    sent = received(sglang)[-1]["body"]
    assert sent["messages"][1]["reasoning_content"] == "look it up" and "reasoning" not in sent["messages"][1]
    assert sent["chat_template_kwargs"] == {"thinking": True, "preserve_thinking": True}


def test_reasoning_under_vllms_name_is_served_on_llama_cpp(kimi_llama, start_gateway):
    """The Kimi template renders an assistant turn's reasoning_content: a mapped `reasoning` makes the real
    server's prompt longer by exactly what an explicit reasoning_content does."""
    url = start_gateway({"backends": [{"name": "gguf", "kind": "llamacpp", "url": kimi_llama}],
                         "routes": [{"name": "kimi-k2.5", "targets": ["gguf"]}]}, name="gateway-generations-llama")

    def prompt_tokens(**reasoning) -> int:
        history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", **reasoning},
                   {"role": "user", "content": "and?"}]
        return sdk(url).chat.completions.create(model="kimi-k2.5", messages=history, max_tokens=1).usage.prompt_tokens
    bare = prompt_tokens()
    assert prompt_tokens(reasoning="the river is blue") == prompt_tokens(reasoning_content="the river is blue") > bare


# --- hosted model lifecycle -------------------------------------------------------------------------------


@pytest.mark.parametrize("route, date", [("moonshot-v1-8k", "2026-08-31"), ("kimi-k2-thinking", "2026-05-25")])
def test_a_retired_unmapped_id_is_a_404_naming_the_retirement(gateway, moonshot, route, date):
    before = len(received(moonshot))
    with sdk(gateway) as client, pytest.raises(openai.NotFoundError) as failure:
        client.chat.completions.create(model=route, messages=ASK, max_tokens=4)
    error = failure.value.body
    assert error["code"] == "model_retired" and error["param"] == "model"
    assert f"'{route}' was retired on {date}" in error["message"] and "successor" in error["message"]
    assert len(received(moonshot)) == before  # nothing was sent, to this generation or another


def test_a_mapped_id_answers_with_the_header(gateway, moonshot):
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="kimi-k2.5", messages=ASK, max_tokens=4)
    assert raw.headers["x-kimi-adjusted"] == "model=kimi-k2.6" and raw.parse().model == "kimi-k2.5"
    assert received(moonshot)[-1]["body"]["model"] == "kimi-k2.6"


def test_a_coming_retirement_is_warned_in_log_and_metrics(gateway, tmp_path_factory):
    metrics = httpx.get(gateway.removesuffix("/v1") + "/metrics", timeout=10).text
    assert any(f'kimi_gateway_hosted_model_retirement_days{{backend="hosted",model="kimi-k2.6"}} {days}.0' in metrics
               for days in days_to_soon()), metrics
    assert 'kimi_gateway_hosted_model_retirement_days{backend="private",model="kimi-k2.5"}' in metrics
    logs = Path(tmp_path_factory.getbasetemp()) / "logs0" / "gateway-generations.log"
    text = logs.read_text() if logs.exists() else "".join(
        p.read_text() for p in Path(tmp_path_factory.getbasetemp()).glob("logs*/gateway-generations.log"))
    assert any(f"hosted model 'kimi-k2.6' retires on {SOON} (in {days} days)" in text for days in days_to_soon())

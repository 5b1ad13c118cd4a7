"""The golden corpus (tests/golden/generations/<generation>.json): request/response pairs per Kimi generation, written from
reference/ (not recorded from live traffic), run through the real gateway against the emulators, each one
whole and streamed. A case names its gateway route (`target`), its turns and, per turn, what the backend must
have received (`upstream`: `equals`, `present`, `absent`, dotted paths), what the client must see (`reply`,
`adjusted`, `status`, `error`) and, on the hosted API, what the server did with replayed reasoning (`replay`).
A second turn's `history` is the first turn's messages, its assistant turn without reasoning_content (as
frameworks keep it) and a tool result."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT
from tests.integration.test_sglang import start_sglang

KEY = "sk-golden-test-123"
CORPUS = Path(__file__).parents[1] / "golden" / "generations"
CASES = [pytest.param(path.stem, index, case, id=f"{path.stem}:{index}:{case['case']}:{case['target']}")
         for path in sorted(CORPUS.glob("*.json")) for index, case in enumerate(json.loads(path.read_text())["cases"])]
HOSTED_ROUTES = {"hosted-k2.5": "kimi-k2.5", "hosted-k2.6": "kimi-k2.6", "hosted-k2.7-code": "kimi-k2.7-code",
                 "hosted-k3": "kimi-k3"}


@pytest.fixture(scope="module")
def servers(start_process, start_gateway) -> dict[str, str]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.emulators.moonshot", "--port", str(port), "--api-key", KEY,
            "--models", "kimi-k2.5,kimi-k2.6,kimi-k2.7-code,kimi-k3"]
    start_process("moonshot-golden", argv, f"http://127.0.0.1:{port}/_emulator/requests", env={"PYTHONPATH": str(ROOT)})
    moonshot = f"http://127.0.0.1:{port}"
    sglang = start_sglang(start_process, "sglang-golden")
    hosted = {"kind": "moonshot", "url": f"{moonshot}/v1", "api_key_env": "MOONSHOT_KEY"}
    mapped = {route: model for route, model in HOSTED_ROUTES.items() if route != "hosted-k2.5"}
    config = {
        "backends": [{"name": "hosted", **hosted, "models": {"kimi-k2.5": "kimi-k2.6", **mapped}},
                     {"name": "private", **hosted, "models": {"hosted-k2.5": "kimi-k2.5"},
                      "retirements": {"kimi-k2.5": "2099-12-31"}},   # a deployment that still serves K2.5
                     {"name": "kt-k25", "kind": "sglang", "url": sglang, "generation": "k2.5"},
                     {"name": "kt-k26", "kind": "sglang", "url": sglang, "generation": "k2.6"}],
        "routes": [{"name": "kimi-k2.5", "targets": ["hosted"]}, {"name": "hosted-k2.5", "targets": ["private"]},
                   *({"name": route, "targets": ["hosted"]} for route in mapped),
                   {"name": "sglang-k2.5", "targets": ["kt-k25"]}, {"name": "sglang-k2.6", "targets": ["kt-k26"]}],
    }
    gateway = start_gateway(config, name="gateway-golden", env={"MOONSHOT_KEY": KEY})
    return {"gateway": gateway, "moonshot": moonshot, "sglang": sglang}


def call(gateway: str, body: dict, stream: bool) -> tuple[int, dict, dict]:
    """(status, reply facts or error body, headers) of one request, whole or streamed."""
    with httpx.Client(timeout=30) as client:
        if not stream:
            response = client.post(f"{gateway}/chat/completions", json=body)
            doc = response.json()
            if response.status_code != 200:
                return response.status_code, doc, response.headers
            choice = doc["choices"][0]
            message = choice["message"]
            return 200, {"finish_reason": choice["finish_reason"], "reasoning": message.get("reasoning_content") or "",
                         "content": message.get("content") or "", "tool_calls": message.get("tool_calls") or []}, \
                response.headers
        with client.stream("POST", f"{gateway}/chat/completions", json={**body, "stream": True}) as response:
            text = response.read().decode()
            if response.status_code != 200:
                return response.status_code, json.loads(text), response.headers
    assert text.endswith("data: [DONE]\n\n")
    facts: dict = {"finish_reason": None, "reasoning": "", "content": "", "tool_calls": {}}
    for event in text.split("\n\n"):
        if not event.startswith("data: {"):
            continue
        for choice in json.loads(event[6:])["choices"]:
            delta = choice.get("delta") or {}
            facts["finish_reason"] = choice.get("finish_reason") or facts["finish_reason"]
            facts["reasoning"] += delta.get("reasoning_content") or ""
            facts["content"] += delta.get("content") or ""
            for piece in delta.get("tool_calls") or ():
                entry = facts["tool_calls"].setdefault(piece["index"], {"id": "", "type": "function",
                                                                         "function": {"name": "", "arguments": ""}})
                entry["id"] = piece.get("id") or entry["id"]
                function = piece.get("function") or {}
                entry["function"]["name"] += function.get("name") or ""
                entry["function"]["arguments"] += function.get("arguments") or ""
    facts["tool_calls"] = [facts["tool_calls"][i] for i in sorted(facts["tool_calls"])]
    return 200, facts, response.headers


def at(doc: object, path: str) -> object:
    for part in path.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def complete(call_: dict) -> bool:
    try:
        return isinstance(json.loads(call_["function"]["arguments"]), dict)
    except json.JSONDecodeError:
        return False


def check_upstream(sent: dict, expect: dict) -> None:
    for path, value in expect.get("equals", {}).items():
        assert at(sent, path) == value, (path, sent)
    for path in expect.get("present", ()):
        assert at(sent, path), (path, sent)
    for key in expect.get("absent", ()):
        assert key not in sent, (key, sent)
    assert not ("thinking" in sent and "reasoning_effort" in sent), sent


def check_reply(facts: dict, expect: dict) -> None:
    if "finish_reason" in expect:
        assert facts["finish_reason"] == expect["finish_reason"], facts
    if "reasoning" in expect:
        assert bool(facts["reasoning"]) is expect["reasoning"], facts
    if "content" in expect:
        assert bool(facts["content"]) is expect["content"], facts
    if "tool_call_id" in expect:
        assert [c["id"] for c in facts["tool_calls"]] == [expect["tool_call_id"]], facts
        assert all(complete(c) for c in facts["tool_calls"]), facts
    if expect.get("complete_tool_call") is False:
        # what was streamed stays, but nothing is presented as a finished call
        assert facts["finish_reason"] != "tool_calls" and not any(complete(c) for c in facts["tool_calls"]), facts


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("generation, index, case", CASES)
def test_golden(servers, generation, index, case, stream):
    target = case["target"]
    emulator = servers["sglang"] if target.startswith("sglang") else servers["moonshot"]
    user = f"golden-{generation}-{index}-{stream}"
    messages: list = []
    previous: dict | None = None
    for turn in case["turns"]:
        request = dict(turn["request"])
        if request.pop("history", None):
            assistant = {"role": "assistant", "content": previous["content"] or None,
                         "tool_calls": previous["tool_calls"]}
            messages = messages + [assistant, {"role": "tool", "tool_call_id": previous["tool_calls"][0]["id"],
                                               "content": '{"temp_c": 21}'}]
            request["messages"] = messages
        messages = request["messages"]
        before = len(httpx.get(f"{emulator}/_emulator/requests", timeout=10).json())
        status, facts, headers = call(servers["gateway"], {"model": target, "user": user, **request}, stream)
        expect = turn["expect"]
        assert status == expect["status"], facts
        log = httpx.get(f"{emulator}/_emulator/requests", timeout=10).json()
        if status != 200:
            assert expect["error"] in facts["error"]["message"]
            assert len(log) == before  # refused by the gateway, never sent
            continue
        check_upstream(log[-1]["body"], expect.get("upstream", {}))
        check_reply(facts, expect.get("reply", {}))
        if "adjusted" in expect:
            assert set(filter(None, headers.get("x-kimi-adjusted", "").split(","))) == set(expect["adjusted"])
        if "replay" in expect:
            assert httpx.get(f"{emulator}/_emulator/reasoning", timeout=10).json()[-1]["reasoning"] == expect["replay"]
        previous = facts

"""The hosted API's thinking-mode rules against each route rule (reference/moonshot-api.md §2.2, §3)."""
import pytest

from backends.base import AgentRules, BackendRequest
from backends.errors import BackendRejectedError
from backends.hosted import to_moonshot_body

CALL = {"role": "assistant", "tool_calls": [{"id": "f:0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def request(body: dict, thinking: bool = True, **rules) -> BackendRequest:
    return BackendRequest(path="/v1/chat/completions", body={"messages": [], **body}, model="m", route="m",
                          adapter=None, thinking=thinking, rules=AgentRules(**rules))


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("rule, thinking, tool_choice, adjustment", [
    ("downgrade", "enabled", "auto", "tool_choice=auto"),
    ("instant", "disabled", None, "thinking=off:tool_choice"),
])
def test_forced_tool_choice_while_thinking(choice, rule, thinking, tool_choice, adjustment):
    req = request({"tool_choice": choice}, forced_tool_choice=rule)
    body = to_moonshot_body(req, "kimi-k2.5")
    assert body["thinking"] == {"type": thinking}
    assert body["tool_choice"] == (tool_choice or choice)
    assert req.adjustments == [adjustment]


def test_forced_tool_choice_reject_and_no_rule_without_thinking():
    with pytest.raises(BackendRejectedError, match="route rule: reject"):
        to_moonshot_body(request({"tool_choice": "required"}, forced_tool_choice="reject"), "kimi-k2.5")
    req = request({"tool_choice": "required"}, thinking=False, forced_tool_choice="reject")
    assert to_moonshot_body(req, "kimi-k2.5")["tool_choice"] == "required" and req.adjustments == []


@pytest.mark.parametrize("rule, thinking", [("instant", "disabled"), ("forward", "enabled")])
def test_missing_reasoning(rule, thinking):
    req = request({"messages": [CALL]}, missing_reasoning=rule)
    assert to_moonshot_body(req, "kimi-k2.5")["thinking"] == {"type": thinking}


def test_missing_reasoning_reject_and_present_reasoning_passes():
    with pytest.raises(BackendRejectedError, match="reasoning_content"):
        to_moonshot_body(request({"messages": [CALL]}, missing_reasoning="reject"), "kimi-k2.5")
    req = request({"messages": [{**CALL, "reasoning_content": "r"}]}, missing_reasoning="reject")
    assert to_moonshot_body(req, "kimi-k2.5")["thinking"] == {"type": "enabled"}


def test_k3_gets_no_thinking_field():
    assert "thinking" not in to_moonshot_body(request({}), "kimi-k3")

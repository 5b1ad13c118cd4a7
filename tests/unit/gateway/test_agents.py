"""AgentSupport's memory scope: per client key; on an open gateway per `user`, or no memory at all."""
import pytest

from gateway.agents import AgentSupport, memory_scope
from gateway.config import ReasoningMemoryConfig
from gateway.metrics import Metrics, RequestRecorder

CALLS = [{"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
REPLY = {"choices": [{"message": {"role": "assistant", "tool_calls": CALLS, "reasoning_content": "alice's plan"}}]}


def history() -> list[dict]:
    return [{"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "get_weather:0", "content": "21"}]


def turn(agents: AgentSupport, key_name: str, **fields) -> dict:
    """One tool-using request: what it sent on (its messages), its reply remembered as it would be."""
    doc = {"messages": history(), "tools": [], **fields}
    observer = agents.prepare(doc, key_name, RequestRecorder(Metrics()))
    if observer is not None:
        observer.on_document(REPLY)
    return doc["messages"][1]


@pytest.mark.parametrize("key_name, fields, scope", [
    ("team-a", {}, "key:team-a"), ("team-a", {"user": "bob"}, "key:team-a"), ("", {"user": "alice"}, "user:alice"),
    ("", {}, None), ("", {"user": ""}, None), ("", {"user": 7}, None), ("", {"user": ["alice"]}, None),
])
def test_memory_scope(key_name, fields, scope):
    assert memory_scope(key_name, fields) == scope


def test_open_gateway_memory_is_per_user_never_shared():
    agents = AgentSupport(ReasoningMemoryConfig())
    turn(agents, "", user="alice")
    assert "reasoning_content" not in turn(agents, "", user="bob")
    assert "reasoning_content" not in turn(agents, "")
    assert turn(agents, "", user="alice")["reasoning_content"] == "alice's plan"


def test_open_gateway_without_user_remembers_nothing():
    agents = AgentSupport(ReasoningMemoryConfig())
    assert agents.prepare({"messages": history()}, "", RequestRecorder(Metrics())) is None
    turn(agents, "")
    assert len(agents.memory) == 0


def test_keyed_gateway_memory_is_per_key():
    agents = AgentSupport(ReasoningMemoryConfig())
    turn(agents, "team-a", user="alice")
    assert "reasoning_content" not in turn(agents, "team-b", user="alice")
    assert turn(agents, "team-a", user="someone-else")["reasoning_content"] == "alice's plan"

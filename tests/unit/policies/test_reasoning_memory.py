"""ReasoningMemory: scoped per key, keyed by the turn's tool calls, bounded, expiring; and its capture."""
import orjson

from gateway.policies.reasoning_memory import ReasoningCapture, ReasoningMemory

CALLS = [{"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]


def memory(**limits) -> ReasoningMemory:
    return ReasoningMemory(**{"max_entries": 10, "max_bytes": 10_000, "ttl_s": 60, **limits})


def test_restore_puts_reasoning_back_for_the_same_tenant_only():
    store = memory()
    store.remember("team-a", CALLS, "because")
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": CALLS}]
    assert store.restore("team-b", history) == (0, 1) and "reasoning_content" not in history[1]
    assert store.restore("team-a", history) == (1, 0) and history[1]["reasoning_content"] == "because"


def test_same_id_other_arguments_is_another_turn():
    store = memory()
    store.remember("a", CALLS, "paris")
    other = [{**CALLS[0], "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]
    assert store.recall("a", other) is None and store.recall("a", CALLS) == "paris"


def test_bounded_by_entries_and_bytes_least_recent_first():
    store = memory(max_entries=2)
    for index in range(3):
        store.remember("a", [{**CALLS[0], "id": str(index)}], f"r{index}")
    assert len(store) == 2 and store.recall("a", [{**CALLS[0], "id": "0"}]) is None
    small = memory(max_bytes=1024)
    small.remember("a", CALLS, "x" * 600)
    small.remember("a", [{**CALLS[0], "id": "2"}], "y" * 600)
    assert len(small) == 1 and small.recall("a", CALLS) is None
    assert not small.remember("a", CALLS, "z" * 2000)


def test_entries_expire(monkeypatch):
    store = memory(ttl_s=5)
    store.remember("a", CALLS, "r")
    import gateway.policies.reasoning_memory as module
    now = module.time.monotonic()
    monkeypatch.setattr(module.time, "monotonic", lambda: now + 6)
    assert store.recall("a", CALLS) is None and len(store) == 0


def event(delta: dict) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


def test_capture_from_a_stream_of_deltas():
    store = memory()
    capture = ReasoningCapture(store, "a")
    capture.on_block(event({"reasoning_content": "think "}) + event({"reasoning_content": "hard"}))
    capture.on_block(event({"tool_calls": [{"index": 0, "id": "get_weather:0", "type": "function",
                                            "function": {"name": "get_weather", "arguments": ""}}]}))
    capture.on_block(event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})
                     + event({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}) + b"data: [DONE]\n\n")
    capture.finish()
    assert store.recall("a", CALLS) == "think hard"


def test_capture_from_a_whole_reply_needs_both_parts():
    store = memory()
    ReasoningCapture(store, "a").on_document({"choices": [{"message": {"content": "hi", "reasoning_content": "r"}}]})
    assert len(store) == 0
    ReasoningCapture(store, "a").on_document({"choices": [{"message": {"tool_calls": CALLS, "reasoning_content": "r"}}]})
    assert store.recall("a", CALLS) == "r"

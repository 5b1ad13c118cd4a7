"""A tool call cut by max_tokens is never presented as finished (backends/cut_tool_calls.py)."""
from __future__ import annotations

import orjson

from backends.cut_tool_calls import CutCallGuard, fix_cut_document


def call(arguments: str, index: int = 0) -> dict:
    return {"index": index, "id": f"functions.f:{index}", "type": "function",
            "function": {"name": "f", "arguments": arguments}}


def test_whole_reply():
    doc = {"choices": [{"message": {"tool_calls": [call('{"a": 1}'), call('{"b": ', 1)]},
                        "finish_reason": "tool_calls"}]}
    assert fix_cut_document(doc)
    assert doc["choices"][0] == {"message": {"tool_calls": [call('{"a": 1}')]}, "finish_reason": "length"}
    doc = {"choices": [{"message": {"tool_calls": [call('{"b": ')]}, "finish_reason": "length"}]}
    assert fix_cut_document(doc) and "tool_calls" not in doc["choices"][0]["message"]
    whole = {"choices": [{"message": {"tool_calls": [call("{}"), call("", 1)]}, "finish_reason": "tool_calls"}]}
    assert not fix_cut_document(whole) and whole["choices"][0]["finish_reason"] == "tool_calls"


def event(delta: dict, finish: str | None = None, spaced: bool = False) -> bytes:
    doc = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    data = orjson.dumps(doc)
    if spaced:
        data = data.replace(b'":', b'": ')
    return b"data: " + data + b"\n\n"


def test_stream_cut_inside_arguments_ends_with_length():
    guard = CutCallGuard()
    head = event({"tool_calls": [call("")]})
    assert guard.block(head) == head
    part = event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]})
    assert guard.block(part) == part
    finish = event({}, "tool_calls", spaced=True)
    assert b'"finish_reason":"length"' in guard.block(finish)


def test_stream_with_whole_arguments_is_left_alone():
    guard = CutCallGuard()
    block = event({"tool_calls": [call('{"city": "Paris"}')]}) + event({}, "tool_calls")
    assert guard.block(block) == block
    plain = event({"content": "tool_calls"})
    assert guard.block(plain) == plain

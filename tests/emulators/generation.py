"""Deterministic "model output" shared by both emulators.

Owns what a fake model says: the hash-picked words, the reasoning/answer split, stop strings,
tool calls (sglang-kt.md §4, moonshot-api.md §3 "Tool calls"), JSON answers for
`response_format`, token counts and the repeated-prompt cache count. No HTTP here: each
emulator frames an `Output` in its own dialect.

Output is a pure function of (adapter name or base, prompt text, temperature, max_tokens);
thinking only moves the first half of the words into `reasoning`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

VOCABULARY = (
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor",
    "iris", "juniper", "kestrel", "lagoon", "meadow", "nectar", "onyx", "prairie",
    "quartz", "river", "sierra", "tundra", "umber", "valley", "willow", "xenon",
    "yarrow", "zephyr", "aurora", "breeze", "canyon", "dune", "estuary", "forest",
    "glacier", "heath", "island", "jetty", "knoll", "lichen", "mesa", "nebula",
    "orchid", "pebble", "quiver", "ridge", "summit", "thistle", "upland", "vapor",
)
DEFAULT_CHAT_WORDS = 16  # chat max_tokens defaults to None (sglang-kt.md §2.7): the fake model stops here
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions max_tokens default (sglang-kt.md §2.7)
EOS_TOKEN_ID = 163586  # <|im_end|> (moonshot-api.md §5.1): SGLang's matched_stop on a natural stop
TOKENS_PER_MESSAGE = 3  # role markers the chat template adds around each message


def words_for(key: str, count: int) -> list[str]:
    """`count` words picked by hashing `key` with the word position."""
    words = []
    for position in range(max(count, 0)):
        digest = hashlib.sha256(f"{key}#{position}".encode()).digest()
        words.append(VOCABULARY[int.from_bytes(digest[:4], "big") % len(VOCABULARY)])
    return words


def number_for(key: str) -> int:
    """A stable non-negative integer derived from `key`."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def count_tokens(text: str | None) -> int:
    """The emulators' tokenizer: one token per whitespace-separated word."""
    return len(text.split()) if text else 0


def split_pieces(text: str) -> list[str]:
    """Stream pieces, one word each with its leading whitespace; they concatenate back to `text`."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)):]
    return pieces + [tail] if tail else pieces


def split_fragments(text: str) -> list[str]:
    """Two or three non-empty fragments of `text` (tool-call argument streaming)."""
    cuts = sorted({0, len(text) // 3, (2 * len(text)) // 3, len(text)})
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if text[a:b]]


# --- prompts -------------------------------------------------------------------------------------


def message_text(message: dict[str, Any]) -> str:
    """Plain text of one chat message: text parts, media placeholders and history tool calls."""
    content = message.get("content")
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict):
                parts.append(f"<{part.get('type')}>")
    for call in message.get("tool_calls") or []:
        function = (call or {}).get("function") or {}
        parts.append(f"{function.get('name')}({function.get('arguments')})")
    return " ".join(part for part in parts if part)


def chat_prompt_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(f"{m.get('role')}: {message_text(m)}" for m in messages)


def chat_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(count_tokens(message_text(m)) + TOKENS_PER_MESSAGE for m in messages)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def history_tool_call_count(messages: list[dict[str, Any]]) -> int:
    """Tool calls already in the history: the `{idx}` of the next tool-call id (sglang-kt.md §4)."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def output_key(adapter: str | None, prompt: str, temperature: Any, max_tokens: Any) -> str:
    return "\x1f".join([adapter or "base", prompt, repr(temperature), repr(max_tokens)])


# --- JSON values ---------------------------------------------------------------------------------


def sample_value(schema: dict[str, Any], key: str, depth: int = 0) -> Any:
    """A simple value of the schema's type: enum/const first, then by `type`."""
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return sample_object(schema, key, depth + 1)
    if kind == "array":
        return [sample_value(schema.get("items") or {}, f"{key}[0]", depth + 1)] if depth < 4 else []
    if kind == "integer":
        return number_for(key) % 100
    if kind == "number":
        return (number_for(key) % 1000) / 10
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return words_for(key, 1)[0]


def sample_object(schema: dict[str, Any], key: str, depth: int = 0) -> dict[str, Any]:
    """The schema's required properties (all of them if none is required), each filled."""
    properties = schema.get("properties") or {}
    names = schema.get("required") or list(properties)
    if depth > 4:
        return {}
    return {name: sample_value(properties.get(name) or {}, f"{key}.{name}", depth) for name in names}


def json_answer(response_format: dict[str, Any], key: str, words: list[str]) -> str | None:
    """Content for `response_format` json_object / json_schema; None for text or no format."""
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"answer": " ".join(words)})
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        return json.dumps(sample_object(spec.get("schema") or {}, key))
    return None


# --- tool calls ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # a JSON object, as a string


def declared_functions(tools: list[Any]) -> dict[str, dict[str, Any]]:
    functions = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            functions[function["name"]] = function
    return functions


def mentioned_function(text: str, names: list[str]) -> str | None:
    """The longest declared name that the text asks for as `call <name>`."""
    for name in sorted(names, key=len, reverse=True):
        if re.search(r"\bcall\s+" + re.escape(name) + r"(?![A-Za-z0-9_-])", text):
            return name
    return None


def chosen_function(body: dict[str, Any]) -> dict[str, Any] | None:
    """Which function the fake model calls, if any: named tool_choice, `call <name>`, or required."""
    functions = declared_functions(body.get("tools") or [])
    choice = body.get("tool_choice")
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return functions.get(name) or {"name": name}
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool" and choice != "required":
        return None  # a tool result just came back: the fake model answers it instead of calling again
    named = mentioned_function(last_user_text(messages), list(functions))
    if named is not None:
        return functions[named]
    return next(iter(functions.values())) if choice == "required" else None


def plan_tool_call(body: dict[str, Any], key: str, id_format: str) -> ToolCall | None:
    """One tool call with id `id_format.format(name=, idx=)` and deterministic arguments."""
    function = chosen_function(body)
    if function is None:
        return None
    name = str(function["name"])
    index = history_tool_call_count(body.get("messages") or [])
    arguments = json.dumps(sample_object(function.get("parameters") or {}, f"{key}|{name}"))
    return ToolCall(call_id=id_format.format(name=name, idx=index), name=name, arguments=arguments)


# --- whole outputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    reasoning: str | None
    content: str | None
    tool_call: ToolCall | None
    finish_reason: str
    matched_stop: int | str | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cut_tool_call: bool = False  # max_tokens ran out inside the tool call: `tool_call` holds what was emitted


def cut_call(call: ToolCall, budget: int) -> ToolCall | None:
    """The part of a tool call that fits in `budget` tokens: None when it had not begun; else its arguments
    cut short, which is never a whole JSON object."""
    if budget <= 0:
        return None
    need = count_tokens(call.arguments) + 1
    keep = max(1, (len(call.arguments) * budget) // need)
    return ToolCall(call_id=call.call_id, name=call.name, arguments=call.arguments[:min(keep, len(call.arguments) - 1)])


def apply_stop(text: str, stop: Any, capped: bool) -> tuple[str, str, int | str | None]:
    """Cut `text` at the earliest stop string: (text, finish_reason, matched_stop)."""
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if hits:
        position, matched = min(hits)
        return text[:position], "stop", matched
    return (text, "length", None) if capped else (text, "stop", EOS_TOKEN_ID)


def max_tokens_of(body: dict[str, Any]) -> int | None:
    value = body.get("max_tokens")
    return value if value is not None else body.get("max_completion_tokens")


def plan_chat(
    body: dict[str, Any], *, adapter: str | None, thinking: bool, tool_id_format: str | None
) -> Output:
    """The fake chat answer. `tool_id_format` None means tool calls are not parsed."""
    messages = body.get("messages") or []
    max_tokens = max_tokens_of(body)
    key = output_key(adapter, chat_prompt_text(messages), body.get("temperature"), max_tokens)
    words = words_for(key, DEFAULT_CHAT_WORDS if max_tokens is None else max_tokens)
    split = len(words) // 2 if thinking else 0
    reasoning = " ".join(words[:split]) or None if thinking else None
    answer_words = words[split:]
    tool_call = plan_tool_call(body, key, tool_id_format) if tool_id_format else None
    reasoning_tokens = count_tokens(reasoning)
    cut = False
    call_tokens = count_tokens(tool_call.arguments) + 1 if tool_call is not None else 0
    if tool_call is not None and max_tokens is not None and reasoning_tokens + call_tokens > max_tokens:
        # the budget ends inside the tool-call section (moonshot-api.md §8): what was emitted, then "length"
        tool_call, cut = cut_call(tool_call, max_tokens - reasoning_tokens), True
        content, finish, matched = None, "length", None
        extra_tokens = max(0, max_tokens - reasoning_tokens)
    elif tool_call is not None:
        content, finish, matched = None, "tool_calls", EOS_TOKEN_ID
        extra_tokens = count_tokens(tool_call.arguments) + 1
    else:
        json_text = json_answer(body.get("response_format") or {}, key, answer_words)
        if json_text is not None:
            content, finish, matched = json_text, "stop", EOS_TOKEN_ID
        else:
            content, finish, matched = apply_stop(" ".join(answer_words), body.get("stop"), max_tokens is not None)
        extra_tokens = count_tokens(content)
    return Output(
        reasoning=reasoning,
        content=content,
        tool_call=tool_call,
        finish_reason=finish,
        matched_stop=matched,
        prompt_tokens=chat_prompt_tokens(messages),
        completion_tokens=reasoning_tokens + extra_tokens,
        reasoning_tokens=reasoning_tokens,
        cut_tool_call=cut,
    )


def plan_text(body: dict[str, Any], prompt: str, *, adapter: str | None) -> Output:
    """The fake /v1/completions answer for one prompt (max_tokens defaults to 16, so "length")."""
    max_tokens = body.get("max_tokens")
    count = DEFAULT_COMPLETION_TOKENS if max_tokens is None else max_tokens
    key = output_key(adapter, prompt, body.get("temperature"), count)
    text, finish, matched = apply_stop(" ".join(words_for(key, count)), body.get("stop"), True)
    return Output(
        reasoning=None,
        content=text,
        tool_call=None,
        finish_reason=finish,
        matched_stop=matched,
        prompt_tokens=count_tokens(prompt),
        completion_tokens=count_tokens(text),
        reasoning_tokens=0,
    )


def chat_deltas(output: Output) -> list[dict[str, Any]]:
    """The stream deltas after the role chunk: all reasoning, then content, then the tool call."""
    deltas: list[dict[str, Any]] = [{"reasoning_content": p} for p in split_pieces(output.reasoning or "")]
    deltas += [{"content": p} for p in split_pieces(output.content or "")]
    call = output.tool_call
    if call is not None:
        head = {"index": 0, "id": call.call_id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                   for fragment in split_fragments(call.arguments)]
    return deltas


class PromptCache:
    """Which (adapter, prompt) pairs were seen: a repeated prompt counts as fully cached."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def cached_tokens(self, adapter: str | None, prompt: str, prompt_tokens: int) -> int:
        key = f"{adapter or 'base'}\x1f{prompt}"
        hit = key in self._seen
        self._seen.add(key)
        return prompt_tokens if hit else 0

    def clear(self) -> None:
        self._seen.clear()

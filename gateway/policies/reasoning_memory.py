"""ReasoningMemory: the `reasoning_content` of assistant turns that called tools, kept so that it can be put
back when a client sends the history without it (most frameworks drop the field, and the hosted API then
answers 400: reference/moonshot-api.md §3 "Multi-turn tool calls while thinking").

Entries are keyed by a scope plus the turn's tool calls (ids, names and arguments: hosted ids such as
`get_weather:0` repeat across conversations). The scope is the client key, or the `user` on an open gateway
(gateway/agents.py memory_scope), so one tenant never reads another's reasoning.
Bounded in entries and bytes, with a TTL; least recently used entries go first.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import orjson


def turn_key(scope: str, tool_calls: list) -> bytes | None:
    """A stable key for one assistant turn's tool calls, or None when they are malformed."""
    canonical = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return None
        canonical.append((call.get("id") or "", function.get("name") or "", function.get("arguments") or ""))
    return hashlib.blake2b(orjson.dumps([scope, canonical]), digest_size=16).digest()


class ReasoningMemory:
    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._entries: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, scope: str, tool_calls: list, reasoning: str) -> bool:
        key = turn_key(scope, tool_calls)
        size = len(reasoning.encode())
        if key is None or not reasoning or size > self.max_bytes:
            return False
        self._forget(key)
        self._entries[key] = (time.monotonic() + self.ttl_s, reasoning)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._forget(next(iter(self._entries)))
        return True

    def recall(self, scope: str, tool_calls: list) -> str | None:
        key = turn_key(scope, tool_calls)
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._forget(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def _forget(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1].encode())

    def restore(self, scope: str, messages: list) -> tuple[int, int]:
        """Put remembered reasoning back into assistant tool-call turns that lack it: (restored, missed)."""
        restored = missed = 0
        for message in messages:
            if not isinstance(message, dict) or message.get("role") != "assistant":
                continue
            calls = message.get("tool_calls")
            if not calls or not isinstance(calls, list) or message.get("reasoning_content"):
                continue
            reasoning = self.recall(scope, calls)
            if reasoning is None:
                missed += 1
            else:
                message["reasoning_content"] = reasoning
                restored += 1
        return restored, missed


class ReasoningCapture:
    """Watches one reply (whole or streamed) and remembers its reasoning if the turn called tools."""

    __slots__ = ("memory", "scope", "reasoning", "calls")

    def __init__(self, memory: ReasoningMemory, scope: str) -> None:
        self.memory, self.scope = memory, scope
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}

    def on_document(self, doc: dict) -> None:
        choices = doc.get("choices") or [{}]
        message = choices[0].get("message") or {}
        if message.get("tool_calls") and message.get("reasoning_content"):
            self.memory.remember(self.scope, message["tool_calls"], message["reasoning_content"])

    def on_block(self, block: bytes) -> None:
        for event in block.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            try:
                doc = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            for choice in doc.get("choices") or ():
                if choice.get("index", 0) == 0:
                    self._on_delta(choice.get("delta") or {})

    def _on_delta(self, delta: dict) -> None:
        if delta.get("reasoning_content"):
            self.reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls") or ():
            entry = self.calls.setdefault(call.get("index", 0), {"id": "", "type": "function",
                                                                  "function": {"name": "", "arguments": ""}})
            entry["id"] = call.get("id") or entry["id"]
            function = call.get("function") or {}
            entry["function"]["name"] += function.get("name") or ""
            entry["function"]["arguments"] += function.get("arguments") or ""

    def finish(self) -> None:
        if self.calls and self.reasoning:
            calls = [self.calls[index] for index in sorted(self.calls)]
            self.memory.remember(self.scope, calls, "".join(self.reasoning))

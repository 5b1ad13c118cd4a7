"""A reply whose `max_tokens` ran out inside a tool-call section ends with `finish_reason: "length"`, and no
half-parsed call is presented as a finished one (moonshot-api.md §8: SGLang's, vLLM's and Dynamo's parsers
drop or mangle such calls, and some say "tool_calls" over arguments that are not even JSON).

Only requests that declared `tools` pay for this. Whole replies: a call whose arguments are not a JSON
object is removed and the choice says "length". Streams: the arguments of each call are gathered from the
events that carry tool-call deltas, and a `"finish_reason":"tool_calls"` over an unfinished call becomes
"length" (what was streamed cannot be taken back; the finish reason tells the client not to run it).
"""
from __future__ import annotations

import re

import orjson

TOOL_CALLS_FINISH = re.compile(rb'"finish_reason":\s*"tool_calls"')
LENGTH_FINISH = b'"finish_reason":"length"'


def complete_arguments(arguments: object) -> bool:
    """A JSON object; "" too (some servers send it for a call without parameters)."""
    if not isinstance(arguments, str):
        return False
    if not arguments:
        return True
    try:
        return isinstance(orjson.loads(arguments), dict)
    except orjson.JSONDecodeError:
        return False


def fix_cut_document(doc: dict) -> bool:
    """In place: unfinished calls out, finish "length". True when something was cut."""
    cut = False
    for choice in doc.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not calls or not isinstance(calls, list):
            continue
        kept = [call for call in calls if isinstance(call, dict)
                and complete_arguments((call.get("function") or {}).get("arguments"))]
        if len(kept) == len(calls):
            continue
        cut = True
        if kept:
            message["tool_calls"] = kept
        else:
            message.pop("tool_calls", None)
        choice["finish_reason"] = "length"
    return cut


class CutCallGuard:
    """Follows one stream's tool-call arguments (choice index, call index) -> text."""

    __slots__ = ("arguments",)

    def __init__(self) -> None:
        self.arguments: dict[tuple[int, int], str] = {}

    def block(self, block: bytes) -> bytes:
        if b'"arguments"' in block:
            self._gather(block)
        elif not self.arguments:  # no call has begun: content and reasoning blocks pass after one scan
            return block
        if TOOL_CALLS_FINISH.search(block) and not all(map(complete_arguments, self.arguments.values())):
            return TOOL_CALLS_FINISH.sub(LENGTH_FINISH, block)
        return block

    def _gather(self, block: bytes) -> None:
        for event in block.split(b"\n\n"):
            if not event.startswith(b"data: {") or b'"arguments"' not in event:
                continue
            try:
                doc = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                continue
            for choice in doc.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                for call in (delta.get("tool_calls") or ()) if isinstance(delta, dict) else ():
                    function = call.get("function") if isinstance(call, dict) else None
                    piece = function.get("arguments") if isinstance(function, dict) else None
                    if isinstance(piece, str):
                        key = (choice.get("index", 0), call.get("index", 0))
                        self.arguments[key] = self.arguments.get(key, "") + piece

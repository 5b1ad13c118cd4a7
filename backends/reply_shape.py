"""OpenAI-exact replies: what the gateway changes in every backend reply so that it matches OpenAI's response
schemas (`CreateChatCompletionResponse`, `…StreamResponse`, `CreateCompletionResponse`), for a whole reply
(already parsed) and for a stream (bytes, never parsed per chunk).

The rules (docs/openai-compat.md has them as a table):
- `id` is the gateway's, one per request: `chatcmpl-<24 hex>` on chat, `cmpl-<24 hex>` on completions.
  Backends vary it (SGLang gives each choice of an `n > 1` stream its own) or mislabel it (llama.cpp
  answers completions with `chatcmpl-…`). In a stream, a top-level id is recognised by its value's
  `chatcmpl-`/`cmpl-` prefix (every backend kind here uses one), which tool-call ids never carry.
- `created` is the gateway's clock when the backend's reply began: one value per request (llama.cpp and
  SGLang stamp each chunk with the second it was written).
Cost per stream event: a backend repeats the same raw `id`, `created` and `model` fields in every event, so
after the first block each is rewritten by `bytes.replace` of the raw field seen last, checked by counting
(`SameField`); the regex pass runs only when a block holds another value (issue 22: about 40% fewer
instructions per relayed event than three regex passes).
- `system_fingerprint` never names a backend build (llama.cpp sends "b1-0c1e570"): a backend's value is
  replaced by `fp_` + the first 10 hex digits of its SHA-256, which still changes when the build changes
  (what the field is for) and names nothing. Absent stays absent.
- `timings` (llama.cpp's per-request speed report; in a stream, on its last chunk, which carries usage) is
  dropped; so is a whole reply's top-level `metadata` from SGLang (`{"weight_version": …}`: OpenAI's
  `metadata` is the client's own, echoed), and SGLang's `usage.prompt_tokens_details: null` (OpenAI omits
  the details it does not have; its schema has no null).
- A whole reply gets what OpenAI always sends, as null where there is no value: `choices[].logprobs`, and
  on chat `message.content` and `message.refusal`; `message.tool_calls: null` is removed (OpenAI omits it,
  and its schema has no null there). Streams already carry their required fields on every backend kind.
Other extensions pass through: `reasoning_content`, SGLang's `matched_stop`, usage details.
"""
from __future__ import annotations

import hashlib
import random
import re

from backends.protocol import CHAT_PATH

ID_FIELD = re.compile(rb'"id":\s*"(?:chatcmpl|cmpl)-[^"\\]*"')
CREATED_FIELD = re.compile(rb'"created":\s*\d+')
FINGERPRINT_FIELD = re.compile(rb'"system_fingerprint":\s*"(?:[^"\\]|\\.)*"')
# `timings` and null usage details are cut by cut_timings() and cut_null_details(): exactly what a regex sub of
# `,?\s*"timings":\s*\{[^{}]*\}` and `,?\s*"(?:prompt|completion)_tokens_details":\s*null` does (tested against
# them), found from their keys (sre tries a pattern with no literal prefix at every byte: 120,000 and 190,000
# instructions on llama.cpp's usage chunk; these, a few thousand).
TIMINGS_KEY = b'"timings":'
DETAILS_KEY = b'_tokens_details":'
SPACE = frozenset(b" \t\n\r\f\v")   # what `\s` matches in a bytes pattern
_fingerprints: dict[bytes, bytes] = {}   # a backend's raw field -> ours; as many entries as backend builds
_NEVER = b'"system_fingerprint":"\x00"'  # JSON text never holds a raw NUL
_last_fingerprint = (_NEVER, _NEVER)     # the pair seen last: a stream repeats it in every chunk


def completion_id(path: str) -> str:
    """Unique, not secret: `random` is reseeded in a forked child, so worker processes never share ids."""
    return ("chatcmpl-%024x" if path == CHAT_PATH else "cmpl-%024x") % random.getrandbits(96)


def fingerprint(value: str) -> str:
    return "fp_" + hashlib.sha256(value.encode()).hexdigest()[:10]


def _fingerprint_field(match: re.Match) -> bytes:
    global _last_fingerprint
    raw = match[0]
    mapped = _fingerprints.get(raw)
    if mapped is None:
        value = raw.split(b":", 1)[1].strip()[1:-1].decode("utf-8", "replace")
        mapped = b'"system_fingerprint":"' + fingerprint(value).encode() + b'"'
        if len(_fingerprints) < 64:
            _fingerprints[raw] = mapped
    _last_fingerprint = (raw, mapped)
    return mapped


def map_fingerprints(block: bytes) -> bytes:
    """bytes.replace for the value seen last (the common case), the regex only when another one remains."""
    raw, mapped = _last_fingerprint
    replaced = block.replace(raw, mapped)
    if replaced.count(b'"system_fingerprint"') != replaced.count(mapped):
        return FINGERPRINT_FIELD.sub(_fingerprint_field, block)   # the raw block: a mapped value is not mapped again
    return replaced


class SameField:
    """Rewrite every match of `pattern` in a block to `new`. Every match contains `key`; when each `key` in the
    block is inside an occurrence of the raw field matched last (equal counts), the block holds no other value
    and one `bytes.replace` does the regex's work. `tail`: the raw field takes the byte after the match too, so
    that a number is never a prefix of a longer one (`"created":17` in `"created":170`)."""

    __slots__ = ("_pattern", "_key", "_new", "_tail", "_raw", "_mapped")

    def __init__(self, pattern: re.Pattern, key: bytes, new: bytes, tail: bool = False) -> None:
        self._pattern, self._key, self._new, self._tail = pattern, key, new, tail
        self._raw = self._mapped = None

    def sub(self, block: bytes) -> bytes:
        raw = self._raw
        if raw is not None:
            mapped = self._mapped
            replaced = block.replace(raw, mapped)
            grown = len(mapped) - len(raw)   # the replacements counted by the length they added: one scan less
            found = (len(replaced) - len(block)) // grown if grown else block.count(raw)
            if found == block.count(self._key):
                return replaced
        match = self._pattern.search(block)
        if match is None:
            return block
        end = match.end()
        if not self._tail:
            self._raw, self._mapped = match[0], self._new
        elif end < len(block):
            self._raw, self._mapped = block[match.start():end + 1], self._new + block[end:end + 1]
        return self._pattern.sub(self._constant, block)

    def _constant(self, _match: re.Match) -> bytes:
        return self._new  # a function, not a template: `new` may hold backslashes (an escaped model name)


# Fields OpenAI's schemas allow to be absent but not null (usage on a completion chunk, role and tool_calls in a
# delta). A string value cannot contain `"usage":null` unescaped, so this never touches content.
NULL_ONLY_FIELD = re.compile(rb',\s*"(?:usage|tool_calls|role)":\s*null(?=\s*[,}])|"(?:usage|tool_calls|role)":\s*null\s*,\s*')
NULL_ONLY_KEY = re.compile(rb'"(?:usage|tool_calls|role)":\s*null')   # in every match of it: a quarter of its cost
# `sub in block` is not used on the stream path: CPython 3.11's bytes.__contains__ first tries the operand as an
# integer and formats, then clears, a TypeError (about 1,600 instructions); bytes.find does not. (Removing the
# null fields by bytes.replace of their compact forms was tried: its many scans cost more than the one regex.)


_last_created: tuple[int, SameField | None] = (-1, None)


def created_field(created: int) -> SameField:
    """The `created` rewrite for a second, shared by the streams that start in it (see model_field() in
    backends/openai_compat.py: SameField's state is a checked cache)."""
    global _last_created
    second, field = _last_created
    if second != created or field is None:
        field = SameField(CREATED_FIELD, b'"created":', b'"created":%d' % created, True)
        _last_created = (created, field)
    return field


class ReplyShape:
    """One request's id and clock, applied to its whole reply or to each block of its stream."""

    __slots__ = ("id", "created", "_chat", "_ids", "_createds")

    def __init__(self, path: str, created: int, stream: bool = True) -> None:
        self.id, self.created, self._chat = completion_id(path), created, path == CHAT_PATH
        if stream:
            self._ids = SameField(ID_FIELD, b"cmpl-", f'"id":"{self.id}"'.encode())
            self._createds = created_field(created)

    def document(self, doc: dict) -> None:
        doc["id"], doc["created"] = self.id, self.created
        if "timings" in doc or "metadata" in doc or "system_fingerprint" in doc:
            self._backend_extensions(doc)
        usage = doc.get("usage")
        if usage.__class__ is dict:
            drop_null_details(usage)
        for choice in doc.get("choices") or ():
            if choice.__class__ is not dict:
                continue
            choice.setdefault("logprobs", None)
            message = choice.get("message")
            if self._chat and message.__class__ is dict:
                message.setdefault("content", None)
                message.setdefault("refusal", None)
                if message.get("tool_calls", ()) is None:
                    del message["tool_calls"]

    @staticmethod
    def _backend_extensions(doc: dict) -> None:
        doc.pop("timings", None)
        doc.pop("metadata", None)
        if isinstance(doc.get("system_fingerprint"), str):
            doc["system_fingerprint"] = fingerprint(doc["system_fingerprint"])

    def block(self, block: bytes) -> bytes:
        """Whole SSE events in, the same events with one id, one `created`, no build fingerprint out."""
        block = self._ids.sub(block)
        block = self._createds.sub(block)
        if block.find(b'"system_fingerprint"') >= 0:
            block = map_fingerprints(block)
        # SGLang writes every unset field as null. The regex costs 10-20 µs a block, so it runs only where one of
        # its three keys is there: llama.cpp's `"finish_reason":null` on every token no longer triggers it.
        if (block.find(b'":null') >= 0 or block.find(b'": null') >= 0) and (
                block.find(b'"usage":null') >= 0 or NULL_ONLY_KEY.search(block) is not None):   # SGLang's, then any
            block = NULL_ONLY_FIELD.sub(b"", block)
        return block

    @staticmethod
    def usage_block(block: bytes) -> bytes:
        """Blocks with usage only (the caller looked): llama.cpp's `timings` rides on its last chunk, which
        always carries usage since the gateway always asks for stream usage; SGLang's null details are usage's."""
        if block.find(TIMINGS_KEY) >= 0:
            block = cut_timings(block).replace(b'{,"', b'{"')
        if block.find(DETAILS_KEY) >= 0:
            block = cut_null_details(block).replace(b'{,"', b'{"')
        return block


def drop_null_details(usage: dict) -> None:
    if usage.get("prompt_tokens_details", 0) is None:
        del usage["prompt_tokens_details"]
    if usage.get("completion_tokens_details", 0) is None:
        del usage["completion_tokens_details"]


def field_start(block: bytes, at: int, start: int) -> int:
    """Where the comma and spaces before a field at `start` begin (`,?\\s*`), as in a regex's leftmost match
    that may not start before `at` (the end of the previous match)."""
    while start > at and block[start - 1] in SPACE:
        start -= 1
    if start > at and block[start - 1] == 44:   # ','
        start -= 1
    return start


def cut_timings(block: bytes) -> bytes:
    """Every `"timings":{…}` (an object with no object inside), with the comma and spaces before it, cut."""
    pieces, at, size, find = [], 0, len(block), block.find
    key = find(TIMINGS_KEY)
    while key >= 0:
        value = key + len(TIMINGS_KEY)
        while value < size and block[value] in SPACE:
            value += 1
        if value < size and block[value] == 123:   # '{'
            close = find(b"}", value + 1)
            if close >= 0 and find(b"{", value + 1, close) < 0:
                pieces.append(block[at:field_start(block, at, key)])
                at = close + 1
                key = find(TIMINGS_KEY, at)
                continue
        key = find(TIMINGS_KEY, key + 1)
    if not pieces:
        return block
    pieces.append(block[at:])
    return b"".join(pieces)


def cut_null_details(block: bytes) -> bytes:
    """Every `"prompt_tokens_details":null` and `"completion_tokens_details":null`, with the comma and spaces
    before it, cut (like the regex, a value that only starts with `null` counts)."""
    pieces, at, size, find = [], 0, len(block), block.find
    key = find(DETAILS_KEY)
    while key >= 0:
        if key >= 7 and block[key - 7:key] == b'"prompt':
            start = key - 7
        elif key >= 11 and block[key - 11:key] == b'"completion':
            start = key - 11
        else:
            start = -1
        value = key + len(DETAILS_KEY)
        while value < size and block[value] in SPACE:
            value += 1
        if start >= at and block.startswith(b"null", value):
            pieces.append(block[at:field_start(block, at, start)])
            at = value + 4
            key = find(DETAILS_KEY, at)
            continue
        key = find(DETAILS_KEY, key + 1)
    if not pieces:
        return block
    pieces.append(block[at:])
    return b"".join(pieces)


# --- stream events that differ only in their text ---------------------------------------------------------

TEXT_KEYS = (b'"content":"', b'"reasoning_content":"')
BACKSLASH = 92


def string_end(data: bytes, start: int) -> int:
    """Index of the quote that closes the JSON string whose text starts at `start`; -1 when there is none."""
    end = data.find(b'"', start)
    while end > start and data[end - 1] == BACKSLASH:
        run = end - 1
        while run > start and data[run - 1] == BACKSLASH:
            run -= 1
        if (end - run) % 2 == 0:   # an even run of backslashes escapes itself, not the quote
            break
        end = data.find(b'"', end + 1)
    return end


def text_span(event: bytes) -> tuple[int, int] | None:
    """Where the text of the first `content` (else `reasoning_content`) string value is, or None."""
    for key in TEXT_KEYS:
        at = event.find(key)
        if at >= 0:
            start = at + len(key)
            end = string_end(event, start)
            return (start, end) if end >= 0 else None
    return None


class TextTemplate:
    """A stream block rewritten once, as a template for the blocks that differ from it only in the text of its
    `content` (or `reasoning_content`) string: a backend writes every token's event with the same fields around
    its text. Every rewrite of a block (backends/openai_compat.py RelayReply._rewrite) acts on whole fields,
    found by keys in quotes, which a JSON string's text cannot hold unescaped: so a block `head + text + tail`
    with the template's raw head and tail is rewritten to its rewritten head + the same text + its rewritten tail,
    by two prefix comparisons instead of a dozen scans and a regex (issue 22: the relay's per-event cost)."""

    __slots__ = ("head", "tail", "new_head", "new_tail", "_head_size", "_tail_size")

    def __init__(self, head: bytes, tail: bytes, new_head: bytes, new_tail: bytes) -> None:
        self.head, self.tail, self.new_head, self.new_tail = head, tail, new_head, new_tail
        self._head_size, self._tail_size = len(head), len(tail)

    @classmethod
    def of(cls, raw: bytes, rewritten: bytes) -> TextTemplate | None:
        """The template a block and its rewrite make, when the rewrite kept the text as it was; None when not."""
        span = text_span(raw)
        if span is None:
            return None
        start, end = span
        found = text_span(rewritten)
        if found is None or rewritten[found[0]:found[1]] != raw[start:end] or raw.startswith(b'"error"', end):
            return None   # (a text that ends `data: {` would make that tail an error event: see event())
        return cls(raw[:start], raw[end:], rewritten[:found[0]], rewritten[found[1]:])

    def event(self, block: bytes) -> bytes | None:
        """apply() of a block that is one event whose text holds no quote, no backslash at its end and no raw
        newline (a token, nearly always), by comparisons alone; None for any other block (apply() decides).
        Such a block is neither `[DONE]` nor an error event, which the relay then need not look for: the text
        holds no `"` and no newline, which both markers need, and the head and tail are from a block that was
        neither (one whose tail starts `"error"`, which a text ending `data: {` would complete, makes none)."""
        end = len(block) - self._tail_size
        size = self._head_size
        if end < size or block[end - 1] == 92 or block[:size] != self.head or block[end:] != self.tail:
            return None
        text = block[size:end]
        if text.translate(None, b'"\n') != text:
            return None
        return self.new_head + text + self.new_tail

    def apply(self, block: bytes) -> bytes | None:
        """The rewrite of a block whose events all have this head and tail around one string's text (a TCP read
        may hold several); None for any other block."""
        head, tail = self.head, self.tail
        end = len(block) - len(tail)
        if end < len(head) or not block.startswith(head):
            return None
        start = len(head)
        if block.endswith(tail) and string_end(block, start) == end:   # one event: the common case
            return self.new_head + block[start:end] + self.new_tail
        pieces, at, size = [], 0, len(block)
        while at < size:
            if not block.startswith(head, at):
                return None
            start = at + len(head)
            end = string_end(block, start)
            if end < 0 or not block.startswith(tail, end):
                return None
            pieces += (self.new_head, block[start:end], self.new_tail)
            at = end + len(tail)
        return b"".join(pieces)

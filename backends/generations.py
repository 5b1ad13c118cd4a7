"""Kimi generations: the one place that knows how K2.5, K2.6, K2.7-code and K3 differ on the wire
(reference/moonshot-api.md §0-§2, §5.2, §8; sglang-kt.md §4). Every driver asks its target's profile
instead of testing model ids, so a K2.5-shaped client request is written in the target's dialect.

| | k2.5 | k2.6 | k2.7-code | k3 |
|---|---|---|---|---|
| hosted switch | `thinking: {type}` | `{type, keep: "all"}` when on (a) | only `{type: enabled, keep: all}` | (b) |
| instant mode | yes | yes | no | no |
| tool-call ids | `functions.<name>:<idx>` | same | same | `<name>_<idx>` (§8) |
| self-hosted parsers | `kimi_k2` / `kimi_k2` | same (same architecture, §0) | same | unknown: configure them |
| self-hosted keep switch | none | `preserve_thinking` template variable (§5.2) | none needed | none |
(a) without `keep` the server drops replayed reasoning (§8). (b) no `thinking`; `reasoning_effort` low/high/max.
Never `thinking` and `reasoning_effort` in one request: the hosted API answers 400 (§8).
Pure data and functions; no I/O, nothing per streamed chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GenerationName = Literal["k2.5", "k2.6", "k2.7-code", "k3"]
K3_EFFORTS = ("low", "high", "max")
# A client's effort (OpenAI's words and K3's) in K3's words: nearest level, never a weaker one than asked.
EFFORT_TO_K3 = {"minimal": "low", "low": "low", "medium": "high", "high": "high", "max": "max", "xhigh": "max"}
EFFORTS = frozenset(EFFORT_TO_K3) | {"none"}
# The fixed sampling the hosted API enforces (§2.1): temperature by mode, the rest always.
FIXED_TOP_P, FIXED_N, FIXED_PENALTY = 0.95, 1, 0
THINKING_TEMPERATURE, INSTANT_TEMPERATURE = 1.0, 0.6


@dataclass(frozen=True, slots=True)
class Generation:
    name: str
    thinking_field: bool               # the hosted API takes a `thinking` object
    keep_field: bool                   # ... with `keep: "all"`, sent whenever thinking is on
    always_thinks: bool                # no instant mode
    effort_field: bool                 # takes `reasoning_effort` (and then never `thinking`)
    tool_id_format: str                # what its tool-call ids look like (kept intact, never rewritten)
    reasoning_parser: str | None       # SGLang --reasoning-parser
    tool_call_parser: str | None       # SGLang --tool-call-parser
    keep_template_kwarg: str | None    # self-hosted: the template variable that keeps replayed reasoning

    def hosted_switch(self, thinking: bool, effort: str | None) -> dict:
        """The fields that carry the mode in a hosted body: exactly one of `thinking` / `reasoning_effort`."""
        if self.effort_field:
            return {"reasoning_effort": EFFORT_TO_K3[effort]} if effort in EFFORT_TO_K3 else {}
        if not thinking:
            return {"thinking": {"type": "disabled"}}
        return {"thinking": {"type": "enabled", "keep": "all"} if self.keep_field else {"type": "enabled"}}

    def template_kwargs(self, thinking: bool) -> dict:
        """The self-hosted form (`chat_template_kwargs`): `thinking`, plus the keep variable when it has one."""
        if thinking and self.keep_template_kwarg:
            return {"thinking": True, self.keep_template_kwarg: True}
        return {"thinking": thinking}

    def fixed_sampling(self, thinking: bool) -> dict:
        """What the hosted API accepts for this generation and mode; anything else is a 400 (§2.1)."""
        temperature = THINKING_TEMPERATURE if thinking or self.always_thinks else INSTANT_TEMPERATURE
        return {"temperature": temperature, "top_p": FIXED_TOP_P, "n": FIXED_N,
                "presence_penalty": FIXED_PENALTY, "frequency_penalty": FIXED_PENALTY}


K2_TOOL_IDS = "functions.{name}:{idx}"
GENERATIONS: dict[str, Generation] = {
    "k2.5": Generation("k2.5", True, False, False, False, K2_TOOL_IDS, "kimi_k2", "kimi_k2", None),
    "k2.6": Generation("k2.6", True, True, False, False, K2_TOOL_IDS, "kimi_k2", "kimi_k2", "preserve_thinking"),
    "k2.7-code": Generation("k2.7-code", True, True, True, False, K2_TOOL_IDS, "kimi_k2", "kimi_k2", None),
    "k3": Generation("k3", False, False, True, True, "{name}_{idx}", None, None, None),
}
# Hosted model id prefixes, most specific first (§1 "Model IDs").
ID_PREFIXES = (("kimi-k3", "k3"), ("kimi-k2.7-code", "k2.7-code"), ("kimi-k2.6", "k2.6"), ("kimi-k2.5", "k2.5"))


def generation(name: str) -> Generation:
    try:
        return GENERATIONS[name]
    except KeyError:
        raise ValueError(f"unknown Kimi generation {name!r} (one of {', '.join(GENERATIONS)})") from None


def generation_of_model(model_id: str) -> Generation | None:
    """The generation a hosted model id names, or None for an id that names none (a custom route)."""
    for prefix, name in ID_PREFIXES:
        if model_id.startswith(prefix):
            return GENERATIONS[name]
    return None


# Markers of each generation's chat template (llamacpp.md §9, moonshot-api.md §5.2). A K2 template carries
# the tool-call section tokens; the K2.6 one reads `preserve_thinking`; K3 reads `reasoning_effort`.
K2_TEMPLATE_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")


def generation_of_template(template: str) -> Generation | None:
    """The generation a chat template (llama-server `/props` `chat_template`) was written for; None for a
    template that is not Kimi's (then the backend's configured generation applies)."""
    if "reasoning_effort" in template:
        return GENERATIONS["k3"]
    if not all(marker in template for marker in K2_TEMPLATE_MARKERS):
        return None
    return GENERATIONS["k2.6"] if "preserve_thinking" in template else GENERATIONS["k2.5"]


def sglang_parser_args(gen: Generation, reasoning_parser: str | None = None,
                       tool_call_parser: str | None = None) -> list[str]:
    """`--reasoning-parser X --tool-call-parser Y` for a generation; explicit names win (a generation whose
    parsers are not known must be given them: an SGLang without them puts reasoning and calls in `content`)."""
    reasoning = reasoning_parser or gen.reasoning_parser
    tools = tool_call_parser or gen.tool_call_parser
    if reasoning is None or tools is None:
        raise ValueError(f"the SGLang parsers for generation {gen.name} are not known: set `reasoning_parser` "
                         "and `tool_call_parser`")
    return ["--reasoning-parser", reasoning, "--tool-call-parser", tools]


# --- history: the reasoning field under both names ------------------------------------------------


def normalise_history(messages: object) -> int:
    """In place, on the client's own (already parsed) history: an assistant turn's `reasoning` (vLLM's name)
    becomes `reasoning_content`, and an empty reasoning is removed (K2.6 reads `""` as missing, §8, and no
    backend can use it), so that memory and the route's rules see one field. Returns how many turns changed."""
    changed = 0
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        if "reasoning" in message:
            alias = message.pop("reasoning")
            if isinstance(alias, str) and alias and not message.get("reasoning_content"):
                message["reasoning_content"] = alias
            changed += 1
        if "reasoning_content" in message and not message["reasoning_content"]:
            del message["reasoning_content"]
            changed += 1
    return changed


# Replies: servers that name the field `reasoning` (vLLM, newer SDK-facing servers: §8) are shown to the
# client as `reasoning_content`. `"reasoning":` cannot occur inside a JSON string (its quotes would be
# escaped), so a byte replacement renames exactly the key; `"reasoning_tokens":` does not match.
REASONING_ALIAS_KEY = b'"reasoning":'


def reasoning_alias_block(block: bytes) -> bytes:
    return block.replace(REASONING_ALIAS_KEY, b'"reasoning_content":') if REASONING_ALIAS_KEY in block else block


def reasoning_alias_document(doc: dict) -> None:
    for choice in doc.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and "reasoning" in message:
            alias = message.pop("reasoning")
            if alias and not message.get("reasoning_content"):
                message["reasoning_content"] = alias

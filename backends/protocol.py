"""The few OpenAI wire facts the gateway checks or rewrites: known request fields and where thinking lives.

Typed models are deliberately absent: on the hot path a request stays a dict (STYLE.md convention 6).
"""
from __future__ import annotations

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# OpenAI's own request fields; anything outside these and EXTENSION_FIELDS is refused with a 400,
# as OpenAI itself answers "Unrecognized request argument supplied".
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "metadata", "store", "service_tier", "reasoning_effort", "modalities", "prediction", "audio",
    "functions", "function_call",
})
OPENAI_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "seed", "echo", "suffix",
    "best_of",
})
# Extensions the Kimi backends understand; each driver translates them or refuses them by name.
SAMPLING_EXTENSION_FIELDS = frozenset({"min_p", "top_k", "repetition_penalty"})
THINKING_FIELDS = frozenset({"thinking", "chat_template_kwargs", "reasoning"})  # every form: gateway/policies/thinking.py
EXTENSION_FIELDS = SAMPLING_EXTENSION_FIELDS | THINKING_FIELDS

# Fields the hosted API fixes per mode (moonshot-api.md §2.1): strip them rather than earn a 400.
HOSTED_FIXED_SAMPLING = ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty")


def known_fields(path: str) -> frozenset[str]:
    return (OPENAI_CHAT_FIELDS if path == CHAT_PATH else OPENAI_COMPLETION_FIELDS) | EXTENSION_FIELDS

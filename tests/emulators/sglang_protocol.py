"""The OpenAI dialect of the SGLang emulator: request checks and response/stream bodies.

Owns what sglang-kt 0.7.2 puts on the wire for `/v1/chat/completions` and `/v1/completions`:
the flat error body and its types (sglang-kt.md §2.5), the in-stream error event (§2.6), the
chunk sequence (role chunk, deltas, separate finish chunk with `matched_stop`, optional
`choices: []` usage chunk, `[DONE]`; §2.6), `usage` with `reasoning_tokens` (§2.6, §4), the
`metadata.weight_version` extra (§2.7), the kimi_k2 reasoning split (§4) and `functions.{name}:{idx}`
tool-call ids (§4).

Serialisation follows the real server byte for byte where a parser could tell: chunks are pydantic
`model_dump_json()` of SGLang's protocol models, so every key is present, unset ones as null, and
every chunk carries `"usage":null` (the usage chunk carries the object); in-stream errors are
`json.dumps` (Python's `", "`/`": "` separators) of `{"error": ErrorResponse}`. Besides the 400 a
ValueError gives, a stream can end with a 5xx-class error event (`"code": 500`, type
`InternalServerError`; 503 `ServiceUnavailable`): inferred from the tokenizer manager, which hands a
stream the abort of a request the scheduler failed with 500/503 instead of raising.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tests.emulators.common import SSE_DONE, sse_event
from tests.emulators.generation import Output, chat_deltas, plan_chat

UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"
KIMI_TOOL_ID_FORMAT = "functions.{name}:{idx}"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessageIn(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class ResponseFormatIn(_Lenient):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]


class ChatRequestIn(_Lenient):
    messages: list[ChatMessageIn]
    model: str = "default"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: ResponseFormatIn | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True
    lora_path: str | list[str | None] | None = None


class CompletionRequestIn(_Lenient):
    prompt: str | list[str] | list[int] | list[list[int]]
    model: str = "default"
    max_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    lora_path: str | list[str | None] | None = None


def validated(model: type[BaseModel], body: Any) -> dict[str, Any]:
    """The body with pydantic's coercions applied; raises ValidationError (-> 400 "Bad Request")."""
    return model.model_validate(body).model_dump(exclude_unset=True)


def error_body(message: str, error_type: str = "BadRequest", code: int = 400) -> dict[str, Any]:
    """The flat SGLang `ErrorResponse` (sglang-kt.md §2.5): no `"error"` wrapper."""
    return {"object": "error", "message": message, "type": error_type, "param": None, "code": code}


def bad_request_body(message: str) -> dict[str, Any]:
    """Validation, malformed JSON and content-type errors: type is HTTPStatus phrase "Bad Request"."""
    return error_body(message, HTTPStatus.BAD_REQUEST.phrase, 400)


STREAM_ERROR_TYPES = {400: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailable"}


def status_error_body(status: int, message: str | None, error_type: str | None) -> dict[str, Any]:
    """A fault-injected error in SGLang's flat shape."""
    defaults = {400: "BadRequest", 500: "InternalServerError"}
    phrase = status_phrase(status)
    text = message or ("Internal server error: emulated fault" if status == 500 else f"{phrase} (emulated fault)")
    return error_body(text, error_type or defaults.get(status, phrase), status)


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def stream_error_event(message: str, error_type: str = "BadRequestError", code: int = 400) -> bytes:
    """An error after the stream started: an SSE event under HTTP 200 (§2.6), as `json.dumps` writes it."""
    return b"data: " + json.dumps({"error": error_body(message, error_type, code)}).encode() + b"\n\n"


def fault_stream_error_event(message: str | None, error_type: str | None, code: int | None) -> bytes:
    """The in-stream error of a `stream_error_after` fault: a 400 ValueError unless a 5xx code is asked."""
    code = code or 400
    default = "emulated in-stream error" if code < 500 else "Internal server error: emulated scheduler abort"
    return stream_error_event(message or default, error_type or STREAM_ERROR_TYPES.get(code, status_phrase(code)), code)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


# --- output --------------------------------------------------------------------------------------


def thinking_requested(body: dict[str, Any]) -> bool:
    """kimi_k2: thinking unless `chat_template_kwargs.thinking is False`; `enable_thinking` is ignored (§4)."""
    return (body.get("chat_template_kwargs") or {}).get("thinking") is not False


def chat_output(body: dict[str, Any], adapter: str | None, reasoning_parser: str | None,
                tool_call_parser: str | None) -> Output:
    """The fake answer as this server's parsers would present it.

    Without a reasoning parser (or with `separate_reasoning: false`) the thinking text and
    `</think>` stay in `content` and `reasoning_content` is null (sglang-kt.md §3.5). Without a
    tool-call parser, tools are not parsed (emulated as: no tool call).
    """
    thinking = thinking_requested(body)
    tool_format = KIMI_TOOL_ID_FORMAT if tool_call_parser else None
    output = plan_chat(body, adapter=adapter, thinking=thinking, tool_id_format=tool_format)
    if thinking and not (reasoning_parser and body.get("separate_reasoning", True)):
        raw = f"{output.reasoning or ''}</think>{output.content or ''}"
        output = dataclasses.replace(output, reasoning=None, content=raw, reasoning_tokens=0)
    if output.cut_tool_call and output.tool_call is not None:
        # max_tokens inside the tool-call section: the kimi_k2 detector presents the half-parsed call as a
        # finished one (moonshot-api.md §8, sglang#23363): the gateway must not pass that on
        output = dataclasses.replace(output, finish_reason="tool_calls", matched_stop=None)
    return output


def usage_body(outputs: list[Output], cached_tokens: int | None) -> dict[str, Any]:
    prompt = sum(o.prompt_tokens for o in outputs)
    completion = sum(o.completion_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None if cached_tokens is None else {"cached_tokens": cached_tokens},
        "reasoning_tokens": sum(o.reasoning_tokens for o in outputs),
    }


def tool_calls_body(output: Output) -> list[dict[str, Any]] | None:
    call = output.tool_call
    if call is None:
        return None
    return [{"id": call.call_id, "index": 0, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]


# --- chat ----------------------------------------------------------------------------------------


def chat_response(output: Output, model: str, usage: dict[str, Any], weight_version: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": output.content, "reasoning_content": output.reasoning,
               "tool_calls": tool_calls_body(output)}
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": output.finish_reason, "matched_stop": output.matched_stop}],
        "usage": usage,
        "metadata": {"weight_version": weight_version},
    }


DELTA_KEYS = ("role", "content", "reasoning_content", "tool_calls")


def tool_call_delta(call: dict[str, Any]) -> dict[str, Any]:
    """A streamed `ToolCall` with every key: `id` and `function.name` are null after the first piece."""
    function = call.get("function") or {}
    return {"id": call.get("id"), "index": call.get("index"), "type": "function",
            "function": {"name": function.get("name"), "arguments": function.get("arguments")}}


def stream_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """A `DeltaMessage` as model_dump_json writes it: all four keys, null when unset."""
    full = {key: delta.get(key) for key in DELTA_KEYS}
    if full["tool_calls"] is not None:
        full["tool_calls"] = [tool_call_delta(call) for call in full["tool_calls"]]
    return full


def chat_events(output: Output, model: str, usage: dict[str, Any], include_usage: bool) -> list[bytes]:
    """Role chunk, reasoning/content/tool-call deltas, finish chunk, usage chunk, [DONE]."""
    head = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None, matched: Any = None) -> bytes:
        choice = {"index": 0, "delta": stream_delta(delta), "logprobs": None, "finish_reason": finish,
                  "matched_stop": matched}
        return sse_event({**head, "choices": [choice], "usage": None})

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk(delta) for delta in chat_deltas(output)]
    events.append(chunk({}, output.finish_reason, output.matched_stop))
    if include_usage:
        events.append(sse_event({**head, "choices": [], "usage": usage}))
    return events + [SSE_DONE]


# --- completions ---------------------------------------------------------------------------------


def prompts_of(body: dict[str, Any]) -> list[str]:
    """One prompt text per batch item: a string, a list of strings, or token ids."""
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, str) for item in prompt):
        return list(prompt)
    if prompt and all(isinstance(item, list) for item in prompt):
        return [" ".join(map(str, ids)) for ids in prompt]
    return [" ".join(map(str, prompt))]


def completion_response(outputs: list[Output], model: str, usage: dict[str, Any],
                        weight_version: str) -> dict[str, Any]:
    choices = [{"index": i, "text": o.content, "logprobs": None, "finish_reason": o.finish_reason,
                "matched_stop": o.matched_stop} for i, o in enumerate(outputs)]
    return {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage, "metadata": {"weight_version": weight_version}}


def completion_events(outputs: list[Output], model: str, usage: dict[str, Any], include_usage: bool) -> list[bytes]:
    """Text deltas per choice, a finish chunk per choice, the usage chunk, [DONE]."""
    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}

    def chunk(index: int, text: str, finish: str | None = None, matched: Any = None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "matched_stop": matched}
        return sse_event({**head, "choices": [choice], "usage": None})

    events = []
    for index, output in enumerate(outputs):
        events += [chunk(index, delta["content"]) for delta in chat_deltas(output)]
        events.append(chunk(index, "", output.finish_reason, output.matched_stop))
    if include_usage:
        events.append(sse_event({**head, "choices": [], "usage": usage}))
    return events + [SSE_DONE]

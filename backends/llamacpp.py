"""LlamaCppDriver: llama-server with GGUF LoRA adapters selected by per-request scales (reference/llamacpp.md).

llama-server can only rescale adapters loaded at start, treats `"lora": []` as "the global scales" and
silently accepts unknown ids (gotchas 1-3), so every request carries a scale for every loaded id and
the driver refuses adapters it did not find in `/lora-adapters`.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import orjson

from backends.base import AdapterFiles, BackendRequest
from backends.errors import (
    BackendError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendUnavailableError,
    UnsupportedFeatureError,
)
from backends.field_support import asks_for_any, check_n, check_unserved, drop_best_of
from backends.json_grammar import UnsupportedSchemaError, response_format_grammar
from backends.openai_compat import OpenAICompatDriver

# OpenAI-style name -> llama-server's name for the same sampling knob.
RENAMED_FIELDS = {"repetition_penalty": "repeat_penalty"}
# A template with these markers gets llama-server's dedicated Kimi K2 handler (llamacpp.md §9).
KIMI_TEMPLATE_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def fix_reasoning(doc: dict, request: BackendRequest) -> None:
    """Known K2.5 gaps on llama.cpp (moonshot-api.md §5.4): with thinking off the answer can land in
    `reasoning_content` with `content` empty, and raw `<think>…</think>` can show up inside `content`."""
    for choice in doc.get("choices") or ():
        message = choice.get("message") or {}
        content, reasoning = message.get("content") or "", message.get("reasoning_content")
        if not request.thinking and not content and reasoning:
            message["content"] = message.pop("reasoning_content")
        elif THINK_CLOSE in content:
            thought, _, answer = content.partition(THINK_CLOSE)
            message["reasoning_content"] = (reasoning or "") + thought.replace(THINK_OPEN, "", 1).strip()
            message["content"] = answer.lstrip()


def fix_reasoning_stream(block: bytes, request: BackendRequest) -> bytes:
    """With thinking off, reasoning deltas are the answer (the same gap, streamed)."""
    if not request.thinking and b'"reasoning_content"' in block:
        return block.replace(b'"reasoning_content":', b'"content":')
    return block


def lora_scales(adapter_ids: Sequence[int], selected: int | None) -> list[dict]:
    """A scale for every loaded id: the base model is all zeros, never `[]` (gotcha 2)."""
    return [{"id": i, "scale": 1.0 if i == selected else 0.0} for i in adapter_ids]


def to_llamacpp_body(request: BackendRequest, adapter_ids: Sequence[int], selected: int | None) -> dict:
    body = dict(request.body)
    body.update(request.sampling)
    drop_best_of(body)  # llama-server ignores best_of; check() refused one that means something
    for name, native in RENAMED_FIELDS.items():
        if name in body:
            body[native] = body.pop(name)
    kwargs = dict(body.get("chat_template_kwargs") or {})
    kwargs["thinking"] = request.thinking
    if request.path.endswith("chat/completions"):
        body["chat_template_kwargs"] = kwargs
    else:
        body.pop("chat_template_kwargs", None)
    if adapter_ids:
        body["lora"] = lora_scales(adapter_ids, selected)
    return body


def error_from_llamacpp(status: int, headers: Mapping[str, str], raw: bytes, backend: str) -> BackendError:
    """llama-server's errors are already OpenAI-shaped: `{"error": {"code", "message", "type"}}`."""
    try:
        error = orjson.loads(raw).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {}
    message = str(error.get("message") or f"llama-server answered HTTP {status}")
    if status == 429:
        return BackendRateLimitedError(message, backend=backend, retry_after_s=_seconds(headers.get("retry-after")))
    if status in (502, 503, 504):
        return BackendUnavailableError(message, backend=backend)
    if 400 <= status < 500:
        return BackendRejectedError(message, status=status, backend=backend,
                                    error_type="invalid_request_error", code=error.get("type"))
    return BackendRejectedError("The backend failed while serving the request.", status=502, backend=backend,
                                error_type="server_error")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class LlamaCppDriver(OpenAICompatDriver):
    kind = "llamacpp"

    def __init__(self, name: str, transports: Sequence, *, adapters: Mapping[str, AdapterFiles],
                 vision: bool = False) -> None:
        super().__init__(name, transports, vision=vision)
        self._adapter_files: dict[str, str] = {}     # adapter name -> GGUF path as registered
        self._ids: list[int] = []                    # every adapter id the server loaded
        self._by_path: dict[str, int] = {}           # real path -> id, from /lora-adapters
        self._id_of: dict[str, int] = {}             # adapter name -> id, for those found on the server
        self.kimi_template: bool | None = None       # unknown until /props answered
        self.slots: int | None = None                # its parallel slots (-np): the most `n` it can serve
        self.plan(adapters)

    def plan(self, adapters: Mapping[str, AdapterFiles]) -> None:
        """A new adapter file needs a llama-server restart to load (gotcha 7): until then it is not usable."""
        self._adapter_files = {name: files.gguf for name, files in adapters.items() if files.gguf}
        self._match_ids()

    def _match_ids(self) -> None:
        self._id_of = {name: self._by_path[os.path.realpath(path)] for name, path in self._adapter_files.items()
                       if os.path.realpath(path) in self._by_path}

    async def start(self) -> None:
        try:
            await self.refresh_adapters()
            await self.refresh_template()
        except (BackendError, ValueError):
            pass  # a server that is down now is retried by the health loop

    async def refresh_adapters(self) -> None:
        """Map configured adapter files to the ids llama-server reports in `/lora-adapters`, by real path.
        Replicas must be started with the same `--lora` list, so the first that answers is the truth."""
        for transport in self._transports:
            try:
                listing = await self.get_json(transport, "/lora-adapters")
            except BackendError:
                continue
            self._by_path = {os.path.realpath(entry["path"]): entry["id"] for entry in listing}
            self._ids = sorted(self._by_path.values())
            self._match_ids()
            return

    async def health(self) -> bool:
        healthy = await super().health()
        if healthy and len(self._id_of) < len(self._adapter_files):
            await self.refresh_adapters()
        if healthy and self.kimi_template is None:
            await self.refresh_template()
        return healthy

    def adapters(self) -> dict[str, bool]:
        return {name: name in self._id_of for name in self._adapter_files}

    fix_document = staticmethod(fix_reasoning)
    fix_block = staticmethod(fix_reasoning_stream)

    async def refresh_template(self) -> None:
        """Which chat handler the server runs decides what `response_format` means there."""
        for transport in self._transports:
            try:
                props = await self.get_json(transport, "/props")
            except (BackendError, ValueError):
                continue
            template = props.get("chat_template") or "" if isinstance(props, dict) else ""
            self.kimi_template = all(marker in template for marker in KIMI_TEMPLATE_MARKERS)
            slots = props.get("total_slots") if isinstance(props, dict) else None
            self.slots = slots if isinstance(slots, int) and slots > 0 else None
            return

    def check(self, request: BackendRequest) -> None:
        super().check(request)
        if asks_for_any(request.body):
            check_n(request.body, self.name, self.slots, "one choice per llama-server slot, and it has {most}")
            check_unserved(request.body, self.name, ("echo", "suffix"), "llama-server accepts it and ignores it")
        self._structured_output_grammar(request)  # refuses a schema that has no grammar form
        if request.adapter is not None and request.adapter not in self._id_of:
            raise UnsupportedFeatureError(
                f"Adapter '{request.adapter}' is not loaded on llama.cpp backend '{self.name}'.", backend=self.name)

    def _structured_output_grammar(self, request: BackendRequest) -> str | None:
        """Under its Kimi handler this build ignores `response_format` but enforces a top-level `grammar`
        (llamacpp.md §9): the schema goes as a grammar, or the request is refused; never unconstrained text
        passed off as structured output."""
        response_format = request.body.get("response_format")
        if not self.kimi_template or not isinstance(response_format, dict):
            return None
        try:
            return response_format_grammar(response_format)
        except UnsupportedSchemaError as exc:
            raise UnsupportedFeatureError(
                f"llama.cpp backend '{self.name}' runs a Kimi chat template, where structured output is enforced "
                f"through a grammar, and this schema has no grammar form: {exc}.", backend=self.name,
                param="response_format") from exc

    def to_body(self, request: BackendRequest) -> dict:
        selected = self._id_of[request.adapter] if request.adapter is not None else None
        grammar = self._structured_output_grammar(request)
        if grammar is not None:
            if request.thinking:  # with thinking on, the constrained text would land in reasoning_content
                request.thinking = False
                request.adjustments.append("thinking=off:structured_output")
            body = to_llamacpp_body(request, self._ids, selected)
            del body["response_format"]
            body["grammar"] = grammar
            return body
        return to_llamacpp_body(request, self._ids, selected)

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        return error_from_llamacpp(status, headers, raw, self.name)

"""LlamaCppDriver: llama-server with GGUF LoRA adapters selected by per-request scales (reference/llamacpp.md).

llama-server can only rescale adapters loaded at start, treats `"lora": []` as "the global scales" and
silently accepts unknown ids (gotchas 1-3), so every request carries a scale for every loaded id and
the driver refuses adapters it did not find in `/lora-adapters`.
"""
from __future__ import annotations

import os
from functools import partial
from typing import ClassVar, Literal, Mapping, Sequence

import orjson
from pydantic import Field

from backends.base import AdapterFiles, BackendRequest, LoadedAdapter
from backends.config import BackendConfigBase, Strict
from backends.launch_config import LogConfig, RestartConfig
from backends.errors import (
    AdapterNotReadyError,
    BackendAccountError,
    BackendError,
    BackendProtocolError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendUnavailableError,
    ServerChangedError,
    UnsupportedFeatureError,
)
from backends.field_support import asks_for_any, check_n, check_unserved, drop_best_of
from backends.generations import EFFORT_TO_K3, Generation, GenerationName, generation, generation_of_template
from backends.json_grammar import UnsupportedSchemaError, response_format_grammar
from backends.openai_compat import OpenAICompatDriver

# OpenAI-style name -> llama-server's name for the same sampling knob.
RENAMED_FIELDS = {"repetition_penalty": "repeat_penalty"}
RENAMED = frozenset(RENAMED_FIELDS)
# A template with these markers gets llama-server's dedicated Kimi K2 handler (llamacpp.md §9).
KIMI_TEMPLATE_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class LlamaLaunchConfig(Strict):
    """With `launch`, the gateway starts and supervises one llama-server per configured URL (its port) and
    restarts it, drained, to change the adapter list (llama-server loads adapters only at start)."""

    binary: str | None = None                    # None: PATH, $KIMI_GATEWAY_LLAMA_SERVER or the user cache
    model: str
    ctx_size: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    parallel: int | None = Field(None, ge=1)     # -np
    args: tuple[str, ...] = ()
    ready_timeout_s: float = Field(120.0, gt=0)
    alias: str | None = None                     # --alias: the name /v1/models shows
    router: bool = False                         # `launch llama-server` only: router mode (llamacpp.md §6)
    restart: RestartConfig = RestartConfig()
    log: LogConfig = LogConfig()


class LlamaCppConfig(BackendConfigBase):
    """A llama.cpp `llama-server` or replicas started with the same model and `--lora` list."""

    adapter_artifact: ClassVar[str | None] = "gguf"
    default_vision: ClassVar[bool] = False       # K2.5 GGUF builds have no vision

    kind: Literal["llamacpp"]
    launch: LlamaLaunchConfig | None = None
    generation: GenerationName | None = None     # None: read from the chat template in /props (else k2.5)


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
    if not request.thinking and block.find(b'"reasoning_content"') >= 0:
        return block.replace(b'"reasoning_content":', b'"content":')
    return block


def lora_scales(adapter_ids: Sequence[int], selected: int | None) -> list[dict]:
    """A scale for every loaded id: the base model is all zeros, never `[]` (gotcha 2)."""
    return [{"id": i, "scale": 1.0 if i == selected else 0.0} for i in adapter_ids]


def to_llamacpp_body(request: BackendRequest, adapter_ids: Sequence[int], selected: int | None,
                     gen: Generation = generation("k2.5")) -> dict:
    sampling = request.sampling
    body = {**request.body, **sampling} if sampling else request.body.copy()   # the client's stays as it came
    if "best_of" in body:
        drop_best_of(body)  # llama-server ignores best_of; check() refused one that means something
    if not RENAMED.isdisjoint(body):
        for name, native in RENAMED_FIELDS.items():
            if name in body:
                body[native] = body.pop(name)
    if request.path.endswith("chat/completions"):
        given = body.get("chat_template_kwargs")   # the client's other template variables, kept
        kwargs = gen.template_kwargs(request.thinking)   # a new dict each call: the body's own
        body["chat_template_kwargs"] = {**given, **kwargs} if given else kwargs
        if gen.effort_field and request.effort in EFFORT_TO_K3:
            body["reasoning_effort"] = EFFORT_TO_K3[request.effort]
    else:
        body.pop("chat_template_kwargs", None)
    if adapter_ids:
        body["lora"] = lora_scales(adapter_ids, selected)
    return body


def error_from_llamacpp(status: int, headers: Mapping[str, str], raw: bytes, backend: str) -> BackendError:
    """llama-server's errors are already OpenAI-shaped: `{"error": {"code", "message", "type"}}`. A 4xx whose
    body is not JSON (a proxy's page) is a broken answer, not the client's fault."""
    try:
        error = orjson.loads(raw).get("error") or {}
    except orjson.JSONDecodeError:
        if 400 <= status < 500 and status != 429:
            return BackendProtocolError(f"HTTP {status} with a body that is not JSON", backend=backend)
        error = {}
    except AttributeError:
        error = {}
    if not isinstance(error, dict):
        error = {}
    message = str(error.get("message") or f"llama-server answered HTTP {status}")
    if status in (401, 403):  # llama-server's --api-key: the gateway's own key is wrong
        return BackendAccountError(f"the gateway's key was refused ({status})", backend=backend)
    if status == 429:
        return BackendRateLimitedError(message, backend=backend, retry_after_s=_seconds(headers.get("retry-after")))
    if status in (401, 403):  # the gateway's own key (api_key_env), not the client's
        return BackendUnavailableError(f"the gateway's key was refused ({status})", backend=backend)
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


# Checked connections each replica's transport keeps ready: llama-server closes every streamed response's
# connection, so each stream needs a new one, and it answers the check only between batch steps.
READY_CHECKED = 4


class LlamaCppDriver(OpenAICompatDriver):
    """Per replica: the adapter files it loaded (`/lora-adapters`: real path -> id) and the versions the
    lifecycle told it to serve, resolved to ids by path. Every new connection first reads `/lora-adapters`
    again (a restart drops all connections), so a replica restarted with another `--lora` list is seen
    before any request reaches it: ids are rebuilt, and a version whose file is gone is not forwarded."""

    kind = "llamacpp"

    def __init__(self, name: str, transports: Sequence, *, vision: bool = False, api_key: str | None = None,
                 gen: Generation | None = None) -> None:
        super().__init__(name, transports, vision=vision, api_key=api_key)
        self._configured_generation = gen
        self.generation = gen or generation("k2.5")   # configured, else read from the template in /props
        count = len(self._transports)
        self._listing: list[dict[str, int] | None] = [None] * count   # real path -> id; None = not read yet
        self._wanted: list[dict[str, AdapterFiles]] = [{} for _ in range(count)]
        self._id_of: list[dict[str, int]] = [{} for _ in range(count)]
        self.kimi_template: bool | None = None       # unknown until /props answered
        for replica, transport in enumerate(self._transports):
            if hasattr(transport, "connection_check"):
                transport.check_path = "/lora-adapters"
                transport.connection_check = partial(self._connection_check, replica)
                transport.check_headers = self._headers
                transport.ready_checked = READY_CHECKED
        self.slots: int | None = None                # its parallel slots (-np): the most `n` it can serve

    async def start(self) -> None:
        for replica in range(len(self._transports)):
            try:
                await self.list_adapters(replica)
            except (BackendError, ValueError):
                pass  # a server that is down now is read again by the health loop and on connect
        try:
            await self.refresh_template()
        except (BackendError, ValueError):
            pass
        await self.discover_limits()

    async def list_adapters(self, replica: int) -> list[LoadedAdapter]:
        listing = await self.get_json(self._transports[replica], "/lora-adapters")
        self._note_listing(replica, listing)
        return [LoadedAdapter(None, entry["path"], entry["id"]) for entry in listing]

    def _connection_check(self, replica: int, status: int, body: bytes) -> None:
        if status != 200:  # a refused key or a server still loading: what a request would have met
            error = self.error_from(status, {}, body)
            raise error if not isinstance(error, BackendRejectedError) else BackendUnavailableError(
                f"GET /lora-adapters answered {status}", backend=self.name)
        try:
            listing = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BackendProtocolError("GET /lora-adapters is not JSON", backend=self.name) from exc
        if self._note_listing(replica, listing):
            raise ServerChangedError("the server's adapter list changed", backend=self.name)

    def _note_listing(self, replica: int, listing: object) -> bool:
        """Take a `/lora-adapters` answer; True when it differs from what requests were built with."""
        if not isinstance(listing, list):
            raise BackendProtocolError("GET /lora-adapters is not a list", backend=self.name)
        by_path = {os.path.realpath(entry["path"]): int(entry["id"]) for entry in listing}
        previous, self._listing[replica] = self._listing[replica], by_path
        if previous == by_path:
            return False
        self._resolve(replica)
        if previous is not None and self.on_replica_change is not None:
            self.on_replica_change(replica)
        return True

    def serve(self, replica: int, adapters: Mapping[str, AdapterFiles]) -> None:
        self._wanted[replica] = dict(adapters)
        self._resolve(replica)

    def _resolve(self, replica: int) -> None:
        """Only versions whose GGUF file this replica loaded are forwarded there, with its id for that file."""
        listing = self._listing[replica] or {}
        id_of = {name: listing[os.path.realpath(files.gguf)] for name, files in self._wanted[replica].items()
                 if files.gguf and os.path.realpath(files.gguf) in listing}
        for name in set(self._serving[replica]) - set(id_of):
            self._recovering.discard(name)
        self._id_of[replica] = id_of
        super().serve(replica, {name: self._wanted[replica][name] for name in id_of})

    def loaded_paths(self, replica: int) -> set[str]:
        return set(self._listing[replica] or ())

    async def _post(self, replica: int, request: BackendRequest):
        """The body is built on the connection it goes out on (checked against the server it reaches), so its
        ids are that server's; sent again once if the check found the server changed."""
        transport = self._transports[replica]
        build = partial(self._payload, request, replica)
        try:
            return await transport.request("POST", request.path, build, self.request_headers(request))
        except ServerChangedError:
            return await transport.request("POST", request.path, build, self.request_headers(request))

    def _payload(self, request: BackendRequest, replica: int) -> bytes:
        if request.adapter is not None and request.adapter not in self._id_of[replica]:
            raise AdapterNotReadyError(f"Adapter version '{request.adapter}' is not loaded on a replica of "
                                       f"'{self.name}' any more.", backend=self.name)
        return orjson.dumps(self.to_body(request, replica))

    async def probe(self, replica: int, adapter: str | None, files: AdapterFiles | None = None) -> str:
        """A version not served yet is probed by its file's id on this replica."""
        if adapter is None or adapter in self._id_of[replica]:
            return await super().probe(replica, adapter, files)
        listing = self._listing[replica] or {}
        path = os.path.realpath(files.gguf) if files is not None and files.gguf else None
        if path not in listing:
            raise AdapterNotReadyError(f"{adapter}: its GGUF is not loaded on {self.replicas[replica]}",
                                       backend=self.name)
        self._id_of[replica][adapter] = listing[path]
        try:
            return await super().probe(replica, adapter, files)
        finally:
            if adapter not in self._serving[replica]:
                self._id_of[replica].pop(adapter, None)

    async def health(self) -> bool:
        healthy = await super().health()
        for replica, up in enumerate(self._up):
            if up and self._listing[replica] is None:
                try:
                    await self.list_adapters(replica)
                except (BackendError, ValueError):
                    pass
        if healthy and self.kimi_template is None:
            await self.refresh_template()
        return healthy

    fix_document = staticmethod(fix_reasoning)
    fix_block = staticmethod(fix_reasoning_stream)

    async def read_concurrency(self, replica: int) -> int | None:
        """`/props` `total_slots`: its parallel slots (-np)."""
        props = await self.get_json(self._transports[replica], "/props")
        slots = props.get("total_slots") if isinstance(props, dict) else None
        return slots if isinstance(slots, int) and slots > 0 else None

    async def refresh_template(self) -> None:
        """Which chat handler the server runs decides what `response_format` means there."""
        for transport in self._transports:
            try:
                props = await self.get_json(transport, "/props")
            except (BackendError, ValueError):
                continue
            template = props.get("chat_template") or "" if isinstance(props, dict) else ""
            self.kimi_template = all(marker in template for marker in KIMI_TEMPLATE_MARKERS)
            if self._configured_generation is None:
                self.generation = generation_of_template(template) or generation("k2.5")
            slots = props.get("total_slots") if isinstance(props, dict) else None
            self.slots = slots if isinstance(slots, int) and slots > 0 else None
            return

    def check(self, request: BackendRequest) -> None:
        super().check(request)
        if asks_for_any(request.body):
            check_n(request.body, self.name, self.slots, "one choice per llama-server slot, and it has {most}")
            check_unserved(request.body, self.name, ("echo", "suffix"), "llama-server accepts it and ignores it")
        self._structured_output_grammar(request)  # refuses a schema that has no grammar form

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

    def to_body(self, request: BackendRequest, replica: int) -> dict:
        selected = self._id_of[replica][request.adapter] if request.adapter is not None else None
        ids = sorted((self._listing[replica] or {}).values())
        grammar = self._structured_output_grammar(request)
        if grammar is not None:
            if request.thinking:  # with thinking on, the constrained text would land in reasoning_content
                request.thinking = False
                request.adjustments.append("thinking=off:structured_output")
            body = to_llamacpp_body(request, ids, selected, self.generation)
            del body["response_format"]
            body["grammar"] = grammar
            return body
        return to_llamacpp_body(request, ids, selected, self.generation)

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        return error_from_llamacpp(status, headers, raw, self.name)

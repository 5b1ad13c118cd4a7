"""SglangDriver: SGLang (+ KTransformers) with LoRA selected as `model: "<served>:<adapter>"`
(reference/sglang-kt.md §1.3), adapters loaded on demand, and SGLang's flat errors made OpenAI-shaped.
"""
from __future__ import annotations

import logging
import re
from functools import partial
from typing import ClassVar, Literal, Mapping, Sequence

import orjson
from pydantic import Field, model_validator

from backends.base import AdapterFiles, BackendRequest, LoadedAdapter
from backends.config import BackendConfigBase, Name
from backends.errors import (
    AdapterMissingError,
    BackendAccountError,
    BackendError,
    BackendProtocolError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendUnavailableError,
    UnsupportedFeatureError,
)
from backends.field_support import asks_for_any, check_unserved, drop_best_of
from backends.generations import EFFORT_TO_K3, Generation, GenerationName, generation, sglang_parser_args
from backends.openai_compat import MAX_ERROR_BODY, OpenAICompatDriver, StreamErrorEvent, parse_json
from backends.sglang_launch import SglangLaunchConfig

log = logging.getLogger(__name__)
ALREADY_LOADED = "already loaded"
# "Got LoRA adapter that has never been loaded: <name>" and "...are not loaded: <name>" (sglang-kt.md §1.2).
NOT_LOADED = re.compile(r"(?:has never been loaded|are not loaded): ([^\n]+)")


class SglangConfig(BackendConfigBase):
    """An SGLang (+ KTransformers) server or replicas (reference/sglang-kt.md)."""

    adapter_artifact: ClassVar[str | None] = "source"

    kind: Literal["sglang"]
    served_model_name: str | None = None         # its --served-model-name (asked from /v1/models when unset)
    max_loaded_adapters: int | None = Field(None, ge=1)   # its --max-loaded-loras: pinned adapters stay within it
    max_lora_rank: int | None = Field(None, ge=1)          # its --max-lora-rank: larger adapters are refused (422)
    expert_adapter: Name | None = None           # KT expert LoRA: the one adapter fixed at launch (§0.1)
    launch: SglangLaunchConfig | None = None     # read by `kimi-gateway launch sglang-kt`
    generation: GenerationName = "k2.5"          # the model it serves: thinking switch, parsers (generations.py)
    reasoning_parser: str | None = None          # --reasoning-parser; None = the generation's
    tool_call_parser: str | None = None          # --tool-call-parser; None = the generation's

    @model_validator(mode="after")
    def _parsers_known(self) -> SglangConfig:
        self.parser_args()  # a generation whose parsers are not known needs them named
        return self

    def parser_args(self) -> list[str]:
        """The launch flags that make SGLang split reasoning and tool calls for this generation."""
        return sglang_parser_args(generation(self.generation), self.reasoning_parser, self.tool_call_parser)


def to_sglang_body(request: BackendRequest, served_model: str, gen: Generation = generation("k2.5")) -> dict:
    body = dict(request.body)
    body.update(request.sampling)
    body["model"] = f"{served_model}:{request.adapter}" if request.adapter else served_model
    body.pop("lora_path", None)  # the adapter is chosen by the gateway only
    drop_best_of(body)           # SGLang would ignore it; check() refused a best_of that means something
    if request.path.endswith("chat/completions"):
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs.update(gen.template_kwargs(request.thinking))   # `enable_thinking` does nothing for kimi_k2 (§4)
        body["chat_template_kwargs"] = kwargs
        if gen.effort_field and request.effort in EFFORT_TO_K3:
            body["reasoning_effort"] = EFFORT_TO_K3[request.effort]
    return body


def sglang_error_fields(doc: object) -> tuple[str, str]:
    """(message, type) from the flat `{"object":"error",...}` body, the nested `{"error":{...}}` one, or
    the auth form `{"error": "Unauthorized"}` (§2.5)."""
    if not isinstance(doc, dict):
        return "", ""
    inner = doc.get("error")
    if isinstance(inner, dict):
        doc = inner
    elif isinstance(inner, str):
        return inner, ""
    return str(doc.get("message") or ""), str(doc.get("type") or "")


def error_from_sglang(status: int, headers: Mapping[str, str], raw: bytes, backend: str) -> BackendError:
    """By status; a 4xx whose body is not JSON (a proxy's page) is a broken answer, not the client's fault."""
    try:
        message, _ = sglang_error_fields(orjson.loads(raw))
    except orjson.JSONDecodeError:
        if 400 <= status < 500 and status != 429:
            return BackendProtocolError(f"HTTP {status} with a body that is not JSON", backend=backend)
        message = ""
    if status == 429:
        retry_after = headers.get("retry-after")
        return BackendRateLimitedError(message or "rate limited", backend=backend,
                                       retry_after_s=float(retry_after) if retry_after else None)
    if status in (401, 403):
        return BackendAccountError(f"the gateway's key was refused ({status})", backend=backend)
    if status in (502, 503, 504):
        return BackendUnavailableError(message or f"HTTP {status}", backend=backend)
    if 400 <= status < 500:
        return BackendRejectedError(message or f"The backend refused the request (HTTP {status}).",
                                    status=status, backend=backend)
    # 500s carry "Internal server error: <python exception>": never show that to clients.
    return BackendRejectedError("The backend failed while serving the request.", status=502, backend=backend,
                                error_type="server_error")


class SglangDriver(OpenAICompatDriver):
    """Adapters by versioned name (`model: "<served>:<name@hash8>"`), loaded by the lifecycle on every replica
    that serves them. A replica that forgot an adapter (a restart) answers "never been loaded"/"not loaded":
    that version stops being forwarded there and the lifecycle reloads it, while requests go to another
    replica or wait, bounded, for the reload."""

    kind = "sglang"
    health_path = "/health"

    def __init__(self, name: str, transports: Sequence, *, served_model: str | None,
                 expert_adapter: str | None = None, vision: bool = True, api_key: str | None = None,
                 gen: Generation = generation("k2.5"), parsers: Mapping[str, str] | None = None) -> None:
        super().__init__(name, transports, vision=vision, api_key=api_key)
        self.generation = gen
        self._parsers = dict(parsers or {})   # what /server_info should say (reasoning_parser, tool_call_parser)
        self._served_model = served_model
        self._expert_adapter = self.expert_adapter = expert_adapter  # KT expert LoRA: only this one, fixed
        self._any_adapter = expert_adapter is not None   # fixed at launch: every replica has it
        self.dynamic_adapters = expert_adapter is None

    async def start(self) -> None:
        try:
            await self.refresh_models()
            await self.check_parsers()
        except (BackendError, ValueError, KeyError, AttributeError):
            pass  # down now; the health loop retries
        await self.discover_limits()

    async def check_parsers(self) -> None:
        """A server launched without the generation's parsers puts reasoning and tool calls in `content`
        (sglang-kt.md §4): say so at start, by name, rather than serve mangled replies silently."""
        info = await self.get_json(self._transports[0], "/server_info")
        for flag, wanted in self._parsers.items():
            running = info.get(flag) if isinstance(info, dict) else None
            if running != wanted:
                log.warning("backend %s serves generation %s but runs %s=%r, not %r: reasoning and tool calls "
                            "will not be split out", self.name, self.generation.name, flag, running, wanted)

    async def refresh_models(self) -> None:
        for transport in self._transports:
            try:
                listing = await self.get_json(transport, "/v1/models")
            except BackendError:
                continue
            base = [card["id"] for card in listing.get("data") or [] if not card.get("parent")]
            if self._served_model is None and base:
                self._served_model = base[0]
            return

    async def health(self) -> bool:
        healthy = await super().health()
        if healthy and self._served_model is None:
            await self.refresh_models()
        return healthy

    async def list_adapters(self, replica: int) -> list[LoadedAdapter]:
        listing = await self.get_json(self._transports[replica], "/v1/models")
        return [LoadedAdapter(card["id"], str(card.get("root") or "")) for card in listing.get("data") or []
                if card.get("parent")]

    async def load_adapter(self, replica: int, name: str, files: AdapterFiles, pinned: bool = False) -> None:
        """`/load_lora_adapter`; "already loaded" is success (another gateway, or a retry, loaded it)."""
        if not self.dynamic_adapters:
            raise UnsupportedFeatureError(f"SGLang backend '{self.name}' has KT expert adapter "
                                          f"'{self._expert_adapter}' fixed at launch.", backend=self.name)
        payload = {"lora_name": name, "lora_path": files.source, "pinned": pinned}
        doc = await self._admin_post(replica, "/load_lora_adapter", payload)
        if doc.get("success") or ALREADY_LOADED in str(doc.get("error_message") or ""):
            return
        raise BackendRejectedError(f"SGLang could not load adapter '{name}': "
                                   f"{doc.get('error_message') or 'no reason given'}", status=502,
                                   backend=self.name, error_type="server_error")

    async def unload_adapter(self, replica: int, name: str) -> None:
        """`/unload_lora_adapter` (SGLang waits for requests still using it); an unknown name is done."""
        if not self.dynamic_adapters:
            raise UnsupportedFeatureError(f"SGLang backend '{self.name}' cannot unload its expert adapter.",
                                          backend=self.name)
        doc = await self._admin_post(replica, "/unload_lora_adapter", {"lora_name": name})
        if doc.get("success") or "does not exist" in str(doc.get("error_message") or ""):
            return
        raise BackendRejectedError(f"SGLang could not unload adapter '{name}': {doc.get('error_message')}",
                                   status=502, backend=self.name, error_type="server_error")

    async def _admin_post(self, replica: int, path: str, payload: dict) -> dict:
        response = await self._transports[replica].request("POST", path, orjson.dumps(payload), self.headers())
        raw = await response.read()
        if response.status not in (200, 400):
            raise self.error_from(response.status, response.headers, raw[:MAX_ERROR_BODY])
        doc = parse_json(raw or b"{}", self.name)
        if not isinstance(doc, dict):
            raise BackendProtocolError(f"{path} answered JSON that is not an object", backend=self.name)
        return doc

    def check(self, request: BackendRequest) -> None:
        super().check(request)
        if asks_for_any(request.body):
            check_unserved(request.body, self.name, ("suffix",), "SGLang ignores it unless it runs a completion template")
        if self._expert_adapter is not None and (request.adapter or "").partition("@")[0] != self._expert_adapter:
            raise UnsupportedFeatureError(
                f"SGLang backend '{self.name}' is dedicated to expert adapter '{self._expert_adapter}'.",
                backend=self.name)

    async def read_concurrency(self, replica: int) -> int | None:
        """`/server_info`: the scheduler's running-request cap per DP rank (internal_states), else the
        `--max-running-requests` it was started with."""
        info = await self.get_json(self._transports[replica], "/server_info")
        states = info.get("internal_states") or [{}]
        slots = states[0].get("effective_max_running_requests_per_dp") or info.get("max_running_requests")
        return slots if isinstance(slots, int) and slots > 0 else None

    def to_body(self, request: BackendRequest, replica: int) -> dict:
        if self._served_model is None:
            raise BackendUnavailableError("the served model name is not known yet", backend=self.name)
        body = to_sglang_body(request, self._served_model, self.generation)
        if self._expert_adapter is not None:  # launched as `--lora-paths <name>=<dir>`: selected by that name
            body["model"] = f"{self._served_model}:{self._expert_adapter}"
        return body

    def replica_error(self, replica: int, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        error = self.error_from(status, headers, raw)
        return self._missing(replica, error.message) or error

    def _missing(self, replica: int, message: str) -> AdapterMissingError | None:
        """SGLang forgets run-time adapters when it restarts (§1.2): its answer names the adapter."""
        match = NOT_LOADED.search(message)
        if match is None:
            return None
        name = match.group(1).strip()
        self.lost(replica, name)
        return AdapterMissingError(f"A replica of '{self.name}' lost an adapter; it is being reloaded.",
                                   backend=self.name, replica=replica)

    def stream_error_for(self, replica: int):
        return partial(self._stream_error_on, replica)

    def _stream_error_on(self, replica: int, event: bytes) -> BackendError:
        error = self.stream_error(event)
        return self._missing(replica, error.message) or error

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        return error_from_sglang(status, headers, raw, self.name)

    def stream_error(self, event: bytes) -> StreamErrorEvent:
        """SGLang reports stream failures as `data: {"error": {...}}` under HTTP 200 (§2.6); its `code`
        is the status it would have answered."""
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            doc = {}
        message, _ = sglang_error_fields(doc)
        inner = doc.get("error") if isinstance(doc, dict) else None
        code = inner.get("code") if isinstance(inner, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 500 else 502
        if status >= 500:  # "Internal server error: <python exception>": never shown to clients
            message = f"SGLang reported an internal error ({code})"
        return StreamErrorEvent(message or "The backend refused the request.", backend=self.name, status=status)

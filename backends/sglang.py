"""SglangDriver: SGLang (+ KTransformers) with LoRA selected as `model: "<served>:<adapter>"`
(reference/sglang-kt.md §1.3), adapters loaded on demand, and SGLang's flat errors made OpenAI-shaped.
"""
from __future__ import annotations

import asyncio
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
from backends.field_support import asks_for_any, check_unserved, drop_best_of
from backends.openai_compat import OpenAICompatDriver, StreamErrorEvent


def to_sglang_body(request: BackendRequest, served_model: str) -> dict:
    body = dict(request.body)
    body.update(request.sampling)
    body["model"] = f"{served_model}:{request.adapter}" if request.adapter else served_model
    body.pop("lora_path", None)  # the adapter is chosen by the gateway only
    drop_best_of(body)           # SGLang would ignore it; check() refused a best_of that means something
    if request.path.endswith("chat/completions"):
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs["thinking"] = request.thinking   # `enable_thinking` does nothing for kimi_k2 (§4)
        body["chat_template_kwargs"] = kwargs
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
    try:
        message, _ = sglang_error_fields(orjson.loads(raw))
    except orjson.JSONDecodeError:
        message = ""
    if status == 429:
        retry_after = headers.get("retry-after")
        return BackendRateLimitedError(message or "rate limited", backend=backend,
                                       retry_after_s=float(retry_after) if retry_after else None)
    if status in (401, 403):
        return BackendUnavailableError(f"the gateway's key was refused ({status})", backend=backend)
    if status in (502, 503, 504):
        return BackendUnavailableError(message or f"HTTP {status}", backend=backend)
    if 400 <= status < 500:
        return BackendRejectedError(message or f"The backend refused the request (HTTP {status}).",
                                    status=status, backend=backend)
    # 500s carry "Internal server error: <python exception>": never show that to clients.
    return BackendRejectedError("The backend failed while serving the request.", status=502, backend=backend,
                                error_type="server_error")


class SglangDriver(OpenAICompatDriver):
    kind = "sglang"
    health_path = "/health"

    def __init__(self, name: str, transports: Sequence, *, served_model: str | None,
                 adapters: Mapping[str, AdapterFiles], expert_adapter: str | None = None, vision: bool = True) -> None:
        super().__init__(name, transports, vision=vision)
        self._served_model = served_model
        self._sources: dict[str, str] = {}           # adapter name -> PEFT dir the server can read
        self._expert_adapter = expert_adapter        # KT expert LoRA: the server serves only this one
        self._loaded: set[str] = set()
        self._load_lock = asyncio.Lock()
        self.plan(adapters)

    def plan(self, adapters: Mapping[str, AdapterFiles]) -> None:
        """Attention-only adapters load on demand at the first request that names them."""
        self._sources = {name: files.source for name, files in adapters.items() if files.source}

    async def start(self) -> None:
        try:
            await self.refresh_models()
        except (BackendError, ValueError, KeyError):
            pass  # down now; the health loop retries

    async def refresh_models(self) -> None:
        listing = await self.get_json(self._transports[0], "/v1/models")
        cards = listing.get("data") or []
        base = [card["id"] for card in cards if not card.get("parent")]
        if self._served_model is None and base:
            self._served_model = base[0]
        self._loaded = {card["id"] for card in cards if card.get("parent")}

    def adapters(self) -> dict[str, bool]:
        return {name: name in self._loaded or name == self._expert_adapter for name in self._sources}

    def check(self, request: BackendRequest) -> None:
        super().check(request)
        if asks_for_any(request.body):
            check_unserved(request.body, self.name, ("suffix",), "SGLang ignores it unless it runs a completion template")
        if self._expert_adapter is not None and request.adapter != self._expert_adapter:
            raise UnsupportedFeatureError(
                f"SGLang backend '{self.name}' is dedicated to expert adapter '{self._expert_adapter}'.",
                backend=self.name)
        if request.adapter is not None and request.adapter not in self._sources:
            raise UnsupportedFeatureError(f"Adapter '{request.adapter}' is not planned on '{self.name}'.",
                                          backend=self.name)

    async def send(self, request: BackendRequest):
        if request.adapter is not None and request.adapter not in self._loaded and request.adapter != self._expert_adapter:
            await self.load_adapter(request.adapter)
        return await super().send(request)

    async def load_adapter(self, name: str) -> None:
        """Load a registered adapter before the first request names it: SGLang must never see a name
        the gateway has not loaded (it would fail mid-stream, or silently reload an evicted one)."""
        async with self._load_lock:
            if name in self._loaded:
                return
            payload = orjson.dumps({"lora_name": name, "lora_path": self._sources[name]})
            response = await self._transports[0].request("POST", "/load_lora_adapter", payload, self.headers())
            doc = orjson.loads(await response.read() or b"{}")
            if response.status != 200 or not doc.get("success"):
                raise BackendRejectedError(f"Adapter '{name}' could not be loaded on '{self.name}'.", status=503,
                                           backend=self.name, error_type="server_error")
            self._loaded = set(doc.get("loaded_adapters") or {name: ""})

    def to_body(self, request: BackendRequest) -> dict:
        if self._served_model is None:
            raise BackendUnavailableError("the served model name is not known yet", backend=self.name)
        return to_sglang_body(request, self._served_model)

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
        if status >= 500:
            message = "The backend failed during the stream."
        return StreamErrorEvent(message or "The backend refused the request.", backend=self.name, status=status)

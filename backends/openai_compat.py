"""What the three drivers share: the byte-level SSE relay, the non-stream rewrite, replica selection and
the send path. Dialects (body translation, error bodies) are the subclasses' pure functions.
"""
from __future__ import annotations

import itertools
import re
import time
from typing import AsyncIterator, Callable, Sequence

import orjson

from backends.base import BackendRequest
from backends.errors import (
    BackendError,
    BackendProtocolError,
    BackendRejectedError,
    BackendUnavailableError,
    UnsupportedFeatureError,
)
from backends.field_support import asks_for_any, check_best_of
from backends.reply_shape import ReplyShape
from backends.transport import UpstreamResponse

# `"model":"…"` cannot occur inside a JSON string value (its quotes would be escaped), so a plain
# substitution over raw event bytes rewrites exactly the top-level field without parsing the event.
MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
DONE = b"data: [DONE]"
EVENT_END = b"\n\n"
MAX_ERROR_BODY = 64 * 1024
REQUEST_ID = "x-request-id"


class StreamErrorEvent(BackendRejectedError):
    """The backend reported an error inside a stream it had already started (HTTP 200); `status` is the
    one it would have answered. Before the client saw a byte it is an ordinary rejection."""

    def __init__(self, message: str, *, backend: str = "", status: int = 500) -> None:
        super().__init__(message, status=status, backend=backend,
                         error_type="invalid_request_error" if status < 500 else "server_error")


def usage_of(doc: dict) -> dict | None:
    """OpenAI puts usage at the top level; the hosted API also puts it in choices[i] (moonshot-api.md §3)."""
    usage = doc.get("usage")
    if usage:
        return usage
    for choice in doc.get("choices") or ():
        if isinstance(choice, dict) and choice.get("usage"):
            return choice["usage"]
    return None


REASONING_FIELD = re.compile(rb',?"reasoning_content":(?:null|"(?:[^"\\]|\\.)*")')
USAGE_ONLY_EVENT = b'"choices":[]'


def strip_reasoning(doc: dict) -> None:
    for choice in doc.get("choices") or ():
        for part in ("message", "delta"):
            if isinstance(choice.get(part), dict):
                choice[part].pop("reasoning_content", None)


class RelayReply:
    """A success reply from an OpenAI-compatible backend, relayed with as little work as possible.

    Per stream block (one TCP read's worth of whole events) it always rewrites `model`, and `id`, `created`
    and build details to OpenAI's shape (backends/reply_shape.py); everything else happens only for
    requests that asked for it: dropping the usage chunk the gateway requested for its
    own metrics, stripping reasoning, and showing tool-using replies to the request's observer.
    """

    def __init__(self, upstream: UpstreamResponse, request: BackendRequest, *, backend: str,
                 stream_error: Callable[[bytes], StreamErrorEvent] | None = None,
                 fix_document: Callable[[dict, BackendRequest], None] | None = None,
                 fix_block: Callable[[bytes, BackendRequest], bytes] | None = None) -> None:
        self.status = upstream.status
        self.usage: dict | None = None
        self._upstream = upstream
        self._request = request
        self._model_field = b'"model":' + orjson.dumps(request.model)
        self._backend = backend
        self._stream_error = stream_error
        self._fix_document = fix_document
        self._fix_block = fix_block
        self.shape = ReplyShape(request.path, int(time.time()), request.stream)

    async def read(self) -> bytes:
        raw = await self._upstream.read()
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackendProtocolError("the backend answered with a body that is not JSON", backend=self._backend) from exc
        if not isinstance(doc, dict):
            raise BackendProtocolError("the backend answered with a JSON body that is not an object", backend=self._backend)
        request = self._request
        doc["model"] = request.model
        self.shape.document(doc)
        self.usage = usage_of(doc)
        if self._fix_document is not None:
            self._fix_document(doc, request)
        if request.observer is not None:
            request.observer.on_document(doc)
        if request.rules.strip_reasoning:
            strip_reasoning(doc)
        return orjson.dumps(doc)

    async def events(self) -> AsyncIterator[bytes]:
        buffer = b""
        async for piece in self._upstream.iter_bytes():
            buffer += piece
            cut = buffer.rfind(EVENT_END)
            if cut < 0:
                continue
            block, buffer = buffer[: cut + 2], buffer[cut + 2 :]
            error_at = block.find(b'data: {"error"') if self._stream_error is not None else -1
            if error_at >= 0:
                if error_at:
                    yield self._rewrite(block[:error_at])
                raise self._stream_error(block[error_at:].split(EVENT_END, 1)[0])
            done = DONE in block
            block = self._rewrite(block)
            if block:
                yield block
            if done:
                if self._request.observer is not None:
                    self._request.observer.finish()
                return
        raise BackendProtocolError("the backend ended the stream before data: [DONE]", backend=self._backend)

    def _rewrite(self, block: bytes) -> bytes:
        request = self._request
        block = self.shape.block(MODEL_FIELD.sub(self._replace_model, block))
        if self._fix_block is not None:
            block = self._fix_block(block, request)
        if b'"usage"' in block:
            block = self.shape.usage_block(block)
            self._note_usage(block)
            if request.hide_usage_chunk and USAGE_ONLY_EVENT in block:
                block = b"".join(event + EVENT_END for event in block.split(EVENT_END)
                                 if event and USAGE_ONLY_EVENT not in event)
        if request.observer is not None:
            request.observer.on_block(block)
        if request.rules.strip_reasoning and b'"reasoning_content"' in block:
            block = REASONING_FIELD.sub(b"", block).replace(b'{,"', b'{"')
        return block

    def _replace_model(self, _match: re.Match) -> bytes:
        return self._model_field

    def _note_usage(self, block: bytes) -> None:
        for event in block.split(EVENT_END):
            if b'"usage"' in event and event.startswith(b"data: {"):
                try:
                    usage = usage_of(orjson.loads(event[6:]))
                except orjson.JSONDecodeError:
                    continue
                if usage:
                    self.usage = usage

    async def aclose(self) -> None:
        await self._upstream.aclose()


class OpenAICompatDriver:
    """Send path shared by every backend kind; subclasses supply to_body() and error_from()."""

    kind = ""
    health_path = "/health"

    def __init__(self, name: str, transports: Sequence, *, vision: bool) -> None:
        self.name = name
        self._transports = list(transports)
        self._up = [True] * len(self._transports)
        self._turn = itertools.cycle(range(len(self._transports)))
        self.vision = vision

    async def start(self) -> None:
        """Discovery hook; the base has nothing to discover."""

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()

    def adapters(self) -> dict[str, bool]:
        return {}

    def plan(self, adapters: dict) -> None:
        """Backends without adapters have nothing to plan."""

    def check(self, request: BackendRequest) -> None:
        if request.has_images and not self.vision:
            raise UnsupportedFeatureError(
                f"The route's backend '{self.name}' ({self.kind}) has no vision: image parts cannot be served there.",
                backend=self.name, param="messages")
        if asks_for_any(request.body):
            check_best_of(request.body, self.name)

    def to_body(self, request: BackendRequest) -> dict:
        raise NotImplementedError

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        raise NotImplementedError

    stream_error: Callable[[bytes], StreamErrorEvent] | None = None  # set by dialects that report errors in-stream
    fix_document: Callable[[dict, BackendRequest], None] | None = None  # dialect repairs of a whole reply
    fix_block: Callable[[bytes, BackendRequest], bytes] | None = None  # ... and of stream blocks

    def headers(self) -> dict[str, str] | None:
        return None

    def request_headers(self, request: BackendRequest) -> dict[str, str] | None:
        """The backend sees the client's `x-request-id`, so that its logs join the gateway's."""
        headers = self.headers()
        if not request.request_id:
            return headers
        return {**headers, REQUEST_ID: request.request_id} if headers else {REQUEST_ID: request.request_id}

    async def send(self, request: BackendRequest) -> RelayReply:
        self.check(request)
        payload = orjson.dumps(self.to_body(request))
        upstream = await self._pick().request("POST", request.path, payload, self.request_headers(request))
        if upstream.status >= 400:
            try:
                raw = await upstream.read()
            finally:
                await upstream.aclose()
            raise self.error_from(upstream.status, upstream.headers, raw[:MAX_ERROR_BODY])
        return RelayReply(upstream, request, backend=self.name, stream_error=self.stream_error,
                          fix_document=self.fix_document, fix_block=self.fix_block)

    def _pick(self):
        """Round-robin over replicas, skipping those the health loop saw down (all down: try anyway)."""
        for _ in range(len(self._transports)):
            index = next(self._turn)
            if self._up[index]:
                return self._transports[index]
        return self._transports[next(self._turn)]

    async def health(self) -> bool:
        for index, transport in enumerate(self._transports):
            self._up[index] = await self._probe(transport)
        return any(self._up)

    async def _probe(self, transport) -> bool:
        try:
            response = await transport.request("GET", self.health_path, b"", self.headers())
            await response.read()
            return response.status < 300
        except BackendError:
            return False

    async def get_json(self, transport, path: str) -> object:
        """A control-plane GET; errors become BackendUnavailableError."""
        response = await transport.request("GET", path, b"", self.headers())
        raw = await response.read()
        if response.status >= 300:
            raise BackendUnavailableError(f"GET {path} answered {response.status}", backend=self.name)
        return orjson.loads(raw)

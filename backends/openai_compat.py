"""What the three drivers share: the byte-level SSE relay, the non-stream rewrite, replica selection and
the send path. Dialects (body translation, error bodies) are the subclasses' pure functions.
"""
from __future__ import annotations

import itertools
import re
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
from backends.transport import UpstreamResponse

# `"model":"…"` cannot occur inside a JSON string value (its quotes would be escaped), so a plain
# substitution over raw event bytes rewrites exactly the top-level field without parsing the event.
MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
DONE = b"data: [DONE]"
EVENT_END = b"\n\n"
MAX_ERROR_BODY = 64 * 1024


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
USAGE_KEY = b'"usage"'


def has_usage_object(data: bytes) -> bool:
    """A usage object, not SGLang's `"usage":null` on every chunk: three substring scans, no parsing."""
    return USAGE_KEY in data and (b'"usage":{' in data or b'"usage": {' in data)


def strip_choice_usage(choices: object) -> bool:
    """Remove usage from inside choices (the hosted API's final choice carries it); True if any was there."""
    found = False
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and choice.pop("usage", None) is not None:
            found = True
    return found


def usage_for_client(doc: dict, client_asked: bool, continuous: bool) -> bool:
    """Shape a stream chunk that carries usage for the client, in place: the OpenAI usage chunk
    (`choices: []`) only for a client that asked for it, usage on other chunks only for one that asked
    for SGLang's `continuous_usage_stats`, usage inside choices never. False: drop the chunk."""
    choices = doc.get("choices")
    if not choices:
        return client_asked
    strip_choice_usage(choices)
    if doc.get("usage") is not None and not continuous:
        doc["usage"] = None
    return True


def strip_reasoning(doc: dict) -> None:
    for choice in doc.get("choices") or ():
        for part in ("message", "delta"):
            if isinstance(choice.get(part), dict):
                choice[part].pop("reasoning_content", None)


class RelayReply:
    """A success reply from an OpenAI-compatible backend, relayed with as little work as possible.

    Per stream block (one TCP read's worth of whole events) it always rewrites `model`; everything else
    happens only for requests that asked for it, or for the one or two events that carry a usage object
    (parsed: counted for metrics, then shown to the client only as the single usage chunk it asked for),
    stripping reasoning, and showing tool-using replies to the request's observer.

    The first `data:` event ends the upstream's first-byte deadline (`first_event_received()`): a head
    that came before prefill does not count as the first byte.
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
        self._usage_shown = False  # the client got its usage chunk
        self._usage_head: dict | None = None  # id/object/created of the event usage came in, for a stand-in

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
        self.usage = usage_of(doc)
        strip_choice_usage(doc.get("choices"))  # top-level usage is the OpenAI contract; a copy in a choice is not
        if self._fix_document is not None:
            self._fix_document(doc, request)
        if request.observer is not None:
            request.observer.on_document(doc)
        if request.rules.strip_reasoning:
            strip_reasoning(doc)
        return orjson.dumps(doc)

    async def events(self) -> AsyncIterator[bytes]:
        buffer = b""
        upstream, waiting_first = self._upstream, True
        async for piece in upstream.iter_bytes():
            buffer += piece
            cut = buffer.rfind(EVENT_END)
            if cut < 0:
                continue
            block, buffer = buffer[: cut + 2], buffer[cut + 2 :]
            if waiting_first and b"data:" in block:  # SSE comments before it are not the first event
                waiting_first = False
                upstream.first_event_received()
            error_at = block.find(b'data: {"error"') if self._stream_error is not None else -1
            if error_at >= 0:
                if error_at:
                    yield self._rewrite(block[:error_at])
                raise self._stream_error(block[error_at:].split(EVENT_END, 1)[0])
            done = DONE in block
            block = self._rewrite(block)
            if done and self._owes_usage_chunk():
                block = block.replace(DONE + EVENT_END, self._stand_in_usage_chunk() + DONE + EVENT_END, 1)
            if block:
                yield block
            if done:
                if self._request.observer is not None:
                    self._request.observer.finish()
                return
        raise BackendProtocolError("the backend ended the stream before data: [DONE]", backend=self._backend)

    def _rewrite(self, block: bytes) -> bytes:
        request = self._request
        block = MODEL_FIELD.sub(self._replace_model, block)
        if self._fix_block is not None:
            block = self._fix_block(block, request)
        if has_usage_object(block):
            block = self._route_usage(block)
        if request.observer is not None:
            request.observer.on_block(block)
        if request.rules.strip_reasoning and b'"reasoning_content"' in block:
            block = REASONING_FIELD.sub(b"", block).replace(b'{,"', b'{"')
        return block

    def _replace_model(self, _match: re.Match) -> bytes:
        return self._model_field

    def _route_usage(self, block: bytes) -> bytes:
        events = [event for event in block.split(EVENT_END) if event]
        kept = (self._usage_event(event) if has_usage_object(event) else event for event in events)
        return b"".join(event + EVENT_END for event in kept if event is not None)

    def _usage_event(self, event: bytes) -> bytes | None:
        """Count the usage of one event, then shape it for the client (None: drop it)."""
        try:
            doc = orjson.loads(event[6:]) if event.startswith(b"data: {") else None
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            return event
        self.usage = usage_of(doc) or self.usage
        self._usage_head = {key: doc.get(key) for key in ("id", "object", "created")}
        request = self._request
        options = request.body.get("stream_options")
        continuous = isinstance(options, dict) and bool(options.get("continuous_usage_stats"))
        if not usage_for_client(doc, not request.hide_usage_chunk, continuous):
            return None
        self._usage_shown = self._usage_shown or not doc.get("choices")
        return b"data: " + orjson.dumps(doc)

    def _owes_usage_chunk(self) -> bool:
        """A client asked for usage and the backend only sent it where the client cannot see it."""
        return (self._request.stream and not self._request.hide_usage_chunk and not self._usage_shown
                and self.usage is not None)

    def _stand_in_usage_chunk(self) -> bytes:
        head = self._usage_head or {}
        chunk = {"id": head.get("id"), "object": head.get("object") or "chat.completion.chunk",
                 "created": head.get("created"), "model": self._request.model, "choices": [], "usage": self.usage}
        self._usage_shown = True
        return b"data: " + orjson.dumps(chunk) + EVENT_END

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

    def to_body(self, request: BackendRequest) -> dict:
        raise NotImplementedError

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        raise NotImplementedError

    stream_error: Callable[[bytes], StreamErrorEvent] | None = None  # set by dialects that report errors in-stream
    fix_document: Callable[[dict, BackendRequest], None] | None = None  # dialect repairs of a whole reply
    fix_block: Callable[[bytes, BackendRequest], bytes] | None = None  # ... and of stream blocks

    def headers(self) -> dict[str, str] | None:
        return None

    async def send(self, request: BackendRequest) -> RelayReply:
        self.check(request)
        payload = orjson.dumps(self.to_body(request))
        upstream = await self._pick().request("POST", request.path, payload, self.headers())
        if upstream.status >= 400:
            try:
                raw = await upstream.read()
            finally:
                await upstream.aclose()
            raise self.error_from(upstream.status, upstream.headers, raw[:MAX_ERROR_BODY])
        if request.stream and not upstream.headers.get("content-type", "").startswith("text/event-stream"):
            await upstream.aclose()  # a proxy's page, or a JSON body, where an SSE stream belongs
            raise BackendProtocolError("the backend answered a stream request without an event stream",
                                       backend=self.name)
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
        """Its own connection and timeout (`transport.probe`): never queued behind data-plane streams."""
        try:
            return await transport.probe(self.health_path, self.headers()) < 300
        except BackendError:
            return False

    async def get_json(self, transport, path: str) -> object:
        """A control-plane GET; an error status becomes BackendUnavailableError, a body that is not JSON
        BackendProtocolError."""
        response = await transport.request("GET", path, b"", self.headers())
        raw = await response.read()
        if response.status >= 300:
            raise BackendUnavailableError(f"GET {path} answered {response.status}", backend=self.name)
        return parse_json(raw, self.name)


def parse_json(raw: bytes, backend: str) -> object:
    """A backend's JSON body; anything else (a proxy's HTML page) is the backend's fault, never the client's."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendProtocolError("the backend answered with a body that is not JSON", backend=backend) from exc

"""What the three drivers share: the byte-level SSE relay, the non-stream rewrite, replica selection and
the send path. Dialects (body translation, error bodies) are the subclasses' pure functions.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from functools import partial
from typing import AsyncIterator, Callable, Mapping, Sequence

import orjson

from backends.balancer import NO_LIMIT
from backends.base import AdapterFiles, BackendRequest, LoadedAdapter
from backends.cut_tool_calls import CutCallGuard, fix_cut_document
from backends.generations import REASONING_ALIAS_KEY, reasoning_alias_block, reasoning_alias_document
from backends.config import OutlierConfig, RetryBudgetConfig
from backends.errors import (
    AdapterNotReadyError,
    BackendError,
    BackendProtocolError,
    BackendRejectedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ServerChangedError,
    UnsupportedFeatureError,
)
from backends.field_support import asks_for_any, check_best_of
from backends.protocol import COMPLETIONS_PATH
from backends.replica_traffic import ReplicaTraffic
from backends.reply_shape import ReplyShape, SameField, TextTemplate, drop_null_details
from backends.transport import UpstreamResponse

log = logging.getLogger(__name__)

# The verification probe: greedy and short, so that it repeats exactly and costs little (issue 13).
PROBE_PROMPT = "The quick brown fox"
PROBE_TOKENS = 8
HOLD_TIMEOUT_S = 30.0   # how long a request waits for a replica that restarts or reloads its adapters

# `"model":"…"` cannot occur inside a JSON string value (its quotes would be escaped), so a plain
# substitution over raw event bytes rewrites exactly the top-level field without parsing the event.
MODEL_FIELD = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
DONE = b"data: [DONE]"
DONE_LINE = b"\n" + DONE   # [DONE] as a line of its own: a token's text may say `data: [DONE]`, never with a raw newline
EVENT_END = b"\n\n"
DONE_EVENT = DONE + EVENT_END
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


TEMPLATE_TRIES = 16   # blocks rewritten in full in a row (no template matched) before a stream stops making templates
REASONING_FIELD = re.compile(rb',?"reasoning_content":(?:null|"(?:[^"\\]|\\.)*")')
USAGE_KEY = b'"usage"'
USAGE_FIELD = b'"usage":'


def has_usage_object(data: bytes) -> bool:
    """A usage object, not SGLang's `"usage":null` on every chunk: three substring scans, no parsing."""
    return data.find(USAGE_KEY) >= 0 and (data.find(b'"usage":{') >= 0 or data.find(b'"usage": {') >= 0)


def object_at(data: bytes, start: int) -> bytes:
    """The JSON object that starts at `start`, by its braces (each `{` before a `}` is one that `}` closes).
    A brace inside a string can make it end elsewhere; then it is not JSON, which the parser says: JSON text
    that parses from the object's `{` to where this ends is exactly that object."""
    end = data.find(b"}", start)
    inner = data.find(b"{", start + 1, end)
    while inner >= 0:
        end = data.find(b"}", end + 1)
        inner = data.find(b"{", inner + 1, end)
    return data[start:end + 1]


def take_usage(doc: dict) -> dict | None:
    """usage_of(doc), with usage removed from inside choices (strip_choice_usage), in one pass over them."""
    usage = doc.get("usage") or None
    choices = doc.get("choices")
    for choice in choices if choices.__class__ is list else ():
        if choice.__class__ is dict:
            found = choice.pop("usage", None)
            if found and usage is None:
                usage = found
    return usage


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
    if "usage" in doc and (doc["usage"] is None or not continuous):
        del doc["usage"]  # OpenAI's completion chunks have an object there or nothing, never null
    return True


def strip_reasoning(doc: dict) -> None:
    for choice in doc.get("choices") or ():
        for part in ("message", "delta"):
            if isinstance(choice.get(part), dict):
                choice[part].pop("reasoning_content", None)


_model_fields: dict[str, SameField] = {}   # model name -> its rewrite; as many as the names clients use


def model_field(model: str) -> SameField:
    """The `model` rewrite for a name, shared by the streams that ask for it: SameField's state only caches the
    raw field a backend wrote last, checked by every sub(), so one stream's serves the next."""
    field = _model_fields.get(model)
    if field is None:
        field = SameField(MODEL_FIELD, b'"model":', b'"model":' + orjson.dumps(model))
        if len(_model_fields) < 64:
            _model_fields[model] = field
    return field


class RelayReply:
    """A success reply from an OpenAI-compatible backend, relayed with as little work as possible.

    Per stream block (one TCP read's worth of whole events) it always rewrites `model`, and `id`, `created`
    and build details to OpenAI's shape (backends/reply_shape.py); everything else happens only for
    requests that asked for it, or for the one or two events that carry a usage object (parsed: counted for
    metrics, then shown to the client only as the single usage chunk it asked for; the chunk the gateway asked
    for and hides is dropped with only its usage object parsed), stripping reasoning, and
    showing tool-using replies to the request's observer.

    The first `data:` event ends the upstream's first-byte deadline (`first_event_received()`): a head
    that came before prefill does not count as the first byte.
    """

    __slots__ = ("status", "_release", "_failed_early", "usage", "_upstream", "_request", "_models", "_backend",
                 "_stream_error", "_fix_document", "_fix_block", "_usage_shown", "_usage_head", "shape", "_cut_guard",
                 "_templates", "_template")

    def __init__(self, upstream: UpstreamResponse, request: BackendRequest, backend: str,
                 stream_error: Callable[[bytes], StreamErrorEvent] | None = None,
                 fix_document: Callable[[dict, BackendRequest], None] | None = None,
                 fix_block: Callable[[bytes, BackendRequest], bytes] | None = None,
                 release: Callable[[], None] | None = None,
                 failed_early: Callable[[], None] | None = None) -> None:
        self.status = upstream.status
        self._release = release  # the driver's in-flight count for this reply's replica and adapter
        self._failed_early = failed_early  # a stream that broke before its first event: the replica's fault
        self.usage: dict | None = None
        self._upstream = upstream
        self._request = request
        self._models = model_field(request.model) if request.stream else None
        self._backend = backend
        self._stream_error = stream_error
        self._fix_document = fix_document
        self._fix_block = fix_block
        self._usage_shown = False  # the client got its usage chunk
        self._usage_head: dict | None = None  # id/object/created of the event usage came in, for a stand-in
        self.shape = ReplyShape(request.path, int(time.time()), request.stream)
        # a stream of a tool-using request: a call cut by max_tokens must not end as "tool_calls"
        self._cut_guard = CutCallGuard() if request.stream and "tools" in request.body else None
        # token events rewritten from a template (backends/reply_shape.py) when no per-block state is involved
        self._templates = TEMPLATE_TRIES if request.stream and self._cut_guard is None and request.observer is None else 0
        self._template: TextTemplate | None = None

    async def read(self) -> bytes:
        try:
            raw = await self._upstream.read()
        except (BackendUnavailableError, BackendProtocolError, BackendTimeoutError):
            if self._failed_early is not None:
                self._failed_early()  # the body broke off: the replica's fault, and the request may go elsewhere
            raise
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackendProtocolError("the backend answered with a body that is not JSON", backend=self._backend) from exc
        if not isinstance(doc, dict):
            raise BackendProtocolError("the backend answered with a JSON body that is not an object", backend=self._backend)
        request = self._request
        doc["model"] = request.model
        self.shape.document(doc)
        self.usage = take_usage(doc)   # top-level usage is the OpenAI contract; a copy in a choice is not
        reasoning_alias_document(doc)  # `reasoning` (vLLM's name) reaches clients as reasoning_content
        if self._fix_document is not None:
            self._fix_document(doc, request)
        if "tools" in request.body:
            fix_cut_document(doc)
        if request.observer is not None:
            request.observer.on_document(doc)
        if request.rules.strip_reasoning:
            strip_reasoning(doc)
        return orjson.dumps(doc)

    async def events(self) -> AsyncIterator[bytes]:
        buffer = b""
        upstream, waiting_first = self._upstream, True
        # The lean transport's pieces are awaited one by one, without an async generator between (a hop per event,
        # and one more generator for the loop to track); other upstreams (httpx, test doubles) through iter_bytes().
        next_piece = getattr(upstream, "next_piece", None)
        pieces = None if next_piece is not None else upstream.iter_bytes()
        if pieces is not None:
            next_piece = partial(anext, pieces, None)
        try:
            while (piece := await next_piece()) is not None:
                # One read, one token event that a template covers: most of a stream (TextTemplate.event says
                # why it cannot be [DONE] or an error event).
                template = self._template
                if template is not None and not buffer and not waiting_first:
                    rewritten = template.event(piece)
                    if rewritten is not None:
                        self._templates = TEMPLATE_TRIES
                        yield rewritten
                        continue
                buffer += piece
                cut = buffer.rfind(EVENT_END)
                if cut < 0:
                    continue
                block, buffer = buffer[: cut + 2], buffer[cut + 2 :]
                if waiting_first and block.find(b"data:") >= 0:  # SSE comments before it are not the first event
                    waiting_first = False
                    upstream.first_event_received()
                error_at = block.find(b'data: {"error"') if self._stream_error is not None else -1
                if error_at >= 0:
                    if error_at:
                        yield self._rewrite(block[:error_at])
                    raise self._stream_error(block[error_at:].split(EVENT_END, 1)[0])
                # bytes.find, not `in`: see backends/reply_shape.py
                done = block.startswith(DONE) or block.find(DONE_LINE) >= 0
                if not done or block != DONE_EVENT or self._request.observer is not None:
                    block = self._rewrite(block)   # (`data: [DONE]` alone holds no field that a rewrite acts on)
                if done and self._owes_usage_chunk():
                    block = block.replace(DONE + EVENT_END, self._stand_in_usage_chunk() + DONE + EVENT_END, 1)
                if block:
                    yield block
                if done:
                    if self._request.observer is not None:
                        self._request.observer.finish()
                    if pieces is not None:   # closed here, not left to the loop's async-generator finalizer
                        await pieces.aclose()   # (a task of its own, through call_soon_threadsafe)
                    return
        except (BackendUnavailableError, BackendProtocolError, BackendTimeoutError):
            if waiting_first and self._failed_early is not None:
                self._failed_early()  # broke before its first event: the replica's fault, retried elsewhere
            raise
        raise BackendProtocolError("the backend ended the stream before data: [DONE]", backend=self._backend)

    def _rewrite(self, block: bytes) -> bytes:
        template = self._template
        if template is not None:
            rewritten = template.apply(block)
            if rewritten is not None:
                self._templates = TEMPLATE_TRIES
                return rewritten
        rewritten = self._rewrite_fields(block)
        if self._templates and rewritten.find(USAGE_KEY) < 0 and block.find(b'"usage":{') < 0 \
                and block.find(b'"usage": {') < 0:   # usage is counted from the block: never from a template
            self._template = TextTemplate.of(block, rewritten) or template
            self._templates -= 1   # a stream whose blocks keep missing stops trying
        return rewritten

    def _rewrite_fields(self, block: bytes) -> bytes:
        request = self._request
        at = block.find(b'"usage":{') if request.hide_usage_chunk else -1
        hidden = at >= 0
        if hidden:
            rest = self._without_hidden_usage(block, at)
            if rest is None:
                hidden = False
            elif request.observer is None and (not rest or rest == DONE_EVENT):
                return rest   # (every rewrite leaves `data: [DONE]` as it is; an observer sees every block)
            else:
                block = rest
        block = self.shape.block(self._models.sub(block))
        if block.find(REASONING_ALIAS_KEY) >= 0:
            block = reasoning_alias_block(block)
        if self._fix_block is not None:
            block = self._fix_block(block, request)
        if self._cut_guard is not None:
            block = self._cut_guard.block(block)
        if hidden or block.find(USAGE_KEY) >= 0:   # (the rest of a hidden chunk's block: rewritten as with it)
            block = self.shape.usage_block(block)
            if block.find(b'"usage":{') >= 0 or block.find(b'"usage": {') >= 0:   # has_usage_object()
                block = self._route_usage(block)
        if request.observer is not None:
            request.observer.on_block(block)
        if request.rules.strip_reasoning and block.find(b'"reasoning_content"') >= 0:
            block = REASONING_FIELD.sub(b"", block).replace(b'{,"', b'{"')
        return block

    def _without_hidden_usage(self, block: bytes, at: int) -> bytes | None:
        """The block without the usage chunk the gateway asked for and hides (`choices: []`), its usage counted:
        only that chunk's usage object (at `at`, the block's first) is parsed, and nothing is rewritten first
        to be dropped (issue 22: the rewrite and parse of llama.cpp's chunk cost about 100,000 instructions a
        stream, its timings' floats most of the parse). Of the rewrites, only usage_block()'s cut of null
        details reaches a usage object as backends write it: drop_null_details() does that here. None where the
        full rewrite must decide: the block holds another usage (or a spaced one, or an empty event, which
        _route_usage() would drop), the chunk is not a `data: {` event with `"choices":[]` and one usage, or
        its usage object does not parse."""
        if block.find(EVENT_END) == len(block) - 2:   # one event, as a backend's own write of it comes
            event = block
        elif block.count(b'"usage":{') != 1 or block.find(b'"usage": {') >= 0 or block.startswith(EVENT_END) \
                or block.find(b"\n\n\n\n") >= 0:
            return None
        else:
            start = block.rfind(EVENT_END, 0, at) + 2
            event = block[start if start > 1 else 0:block.find(EVENT_END, at) + 2]
        if not event.startswith(b"data: {") or event.find(b'"choices":[]') < 0 or event.count(USAGE_FIELD) != 1:
            return None   # (a spaced usage is a second `"usage":` there)
        try:
            usage = orjson.loads(object_at(block, at + 8))
        except orjson.JSONDecodeError:
            return None
        if usage:
            drop_null_details(usage)
            self.usage = usage
        # (_usage_head is for a stand-in usage chunk, which a client who did not ask for usage never gets)
        return b"" if event is block else block.replace(event, b"", 1)

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
        release, self._release = self._release, None
        if release is not None:
            release()
        await self._upstream.aclose()


class OpenAICompatDriver(ReplicaTraffic):
    """Send path shared by every backend kind; subclasses supply to_body() and error_from().

    Replicas: a request goes to a replica that is up, not ejected, and serves its adapter version (the
    lifecycle says which, through serve()), the least loaded of two (backends/balancer.py); none serving it
    is AdapterNotReadyError, never a guess. A connect failure or a 5xx before the response head is retried
    at once on another replica, within the retry budget; failures feed outlier detection (backends/outliers.py),
    whose half-open probes readmit an ejected replica. With `max_concurrency` (or slots read from the
    servers), reserve() leases a free slot or answers None, and the gateway queues the request.
    """

    kind = ""
    health_path = "/health"
    dynamic_adapters = False

    def __init__(self, name: str, transports: Sequence, *, vision: bool, api_key: str | None = None) -> None:
        self.name = name
        # The backend's own key (config `api_key_env`), on every call: data plane and control plane alike.
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._transports = list(transports)
        self.replicas = tuple(getattr(t, "base_url", str(i)) for i, t in enumerate(self._transports))
        self._up = [True] * len(self._transports)
        self._serving: list[dict[str, AdapterFiles]] = [{} for _ in self._transports]
        self._busy = [0] * len(self._transports)
        self._adapter_busy: dict[str, int] = {}
        self._adapter_requests: dict[str, int] = {}    # requests per adapter version so far: its demand
        self._held = [False] * len(self._transports)   # a drained restart is under way there
        self._recovering: set[str] = set()             # adapter versions a replica lost; being reloaded
        self._changed: asyncio.Future | None = None     # wakes requests waiting for a held or lost adapter
        self.hold_timeout_s = HOLD_TIMEOUT_S
        self.expert_adapter: str | None = None          # a server fixed to one adapter at launch (SGLang + KT)
        self.on_replica_change: Callable[[int], None] | None = None
        self.vision = vision
        self._any_adapter = False    # every replica serves every request's adapter (fixed at launch): not checked
        self.configure_traffic(None, OutlierConfig(), RetryBudgetConfig())

    async def start(self) -> None:
        """Discovery hook; the base has nothing to discover."""

    async def aclose(self) -> None:
        if self._readmit_task is not None:
            self._readmit_task.cancel()
            await asyncio.gather(self._readmit_task, return_exceptions=True)
        for transport in self._transports:
            await transport.aclose()

    def check(self, request: BackendRequest) -> None:
        if request.has_images and not self.vision:
            raise UnsupportedFeatureError(
                f"The route's backend '{self.name}' ({self.kind}) has no vision: image parts cannot be served there.",
                backend=self.name, param="messages")
        if asks_for_any(request.body):
            check_best_of(request.body, self.name)

    def to_body(self, request: BackendRequest, replica: int) -> dict:
        raise NotImplementedError

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        raise NotImplementedError

    stream_error: Callable[[bytes], StreamErrorEvent] | None = None  # set by dialects that report errors in-stream
    fix_document: Callable[[dict, BackendRequest], None] | None = None  # dialect repairs of a whole reply
    fix_block: Callable[[bytes, BackendRequest], bytes] | None = None  # ... and of stream blocks

    def headers(self) -> dict[str, str] | None:
        return self._headers

    def stream_error_for(self, replica: int) -> Callable[[bytes], BackendError] | None:
        return self.stream_error

    def request_headers(self, request: BackendRequest) -> dict[str, str] | None:
        """The backend sees the client's `x-request-id`, so that its logs join the gateway's, and the trace
        context (`traceparent`), so that its spans join the caller's trace."""
        headers = self.headers()
        if not request.request_id and not request.traceparent:
            return headers
        headers = {**headers} if headers else {}
        if request.request_id:
            headers[REQUEST_ID] = request.request_id
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        return headers

    async def send(self, request: BackendRequest) -> RelayReply:
        lease, request.lease = request.lease, None   # the queue's slot is ours now, whatever happens
        # check() passed before send() was called (backends/base.py): not asked again per request
        if not request.avoid:
            self.retry_budget.requests += 1
        outliers = self.outliers
        while True:
            if lease is None or lease.replica < 0:   # counted from here: a drain waits for it
                replica = self.balancer.pick(None if self._any_adapter else request.adapter, request.avoid)
                lease = self._lease(replica, request.adapter) if replica is not None else await self._lease_any(request)
            replica = lease.replica
            try:
                upstream = await self._open(replica, request)
            except BaseException as exc:
                lease.release()
                if not (self._replica_failed(replica, request, exc) and getattr(exc, "retryable", False)
                        and self._may_retry_elsewhere(request)):
                    raise
                log.warning("%s replica %s failed before the response (%s); retrying on another replica",
                            self.name, self.replicas[replica], exc)
                lease = None
                continue
            outliers.in_a_row[replica] = 0  # outliers.success(replica), without the call
            outliers.ok[replica] += 1
            # positional: a class called with keywords gets them as a dict (backends/base.py forwarded_request)
            return RelayReply(upstream, request, self.name, self.stream_error_for(replica), self.fix_document,
                              self.fix_block, lease.release, lambda: self._replica_failed(replica, request, None))

    async def _open(self, replica: int, request: BackendRequest) -> UpstreamResponse:
        upstream = await self._post(replica, request)
        if upstream.status >= 400:
            try:
                raw = await upstream.read()
            finally:
                await upstream.aclose()
            raise self.replica_error(replica, upstream.status, upstream.headers, raw[:MAX_ERROR_BODY])
        if request.stream and not upstream.headers.get("content-type", "").startswith("text/event-stream"):
            await upstream.aclose()  # a proxy's page, or a JSON body, where an SSE stream belongs
            raise BackendProtocolError("the backend answered a stream request without an event stream",
                                       backend=self.name)
        return upstream

    async def _post(self, replica: int, request: BackendRequest) -> UpstreamResponse:
        payload = orjson.dumps(self.to_body(request, replica))
        return await self._transports[replica].request("POST", request.path, payload, self.request_headers(request))

    def replica_error(self, replica: int, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        """A dialect may recognise a replica that lost its adapters here (SGLang after a restart)."""
        return self.error_from(status, headers, raw)

    async def _wait_for_replica(self, adapter: str | None) -> int:
        """Wait, bounded, while a replica restarts (held) or reloads an adapter it lost; else not ready now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_timeout_s
        while True:
            if not any(self._held) and adapter not in self._recovering:
                return self._pick(adapter)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AdapterNotReadyError(f"Backend '{self.name}' did not get ready for this request in time.",
                                           backend=self.name)
            if self._changed is None:
                self._changed = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)
            except TimeoutError:
                pass
            try:
                return self._pick(adapter)
            except AdapterNotReadyError:
                continue

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def hold(self, replica: int) -> None:
        """New requests for this replica wait (or go to another) until release(): a drained restart."""
        self._held[replica] = True

    def disconnect(self, replica: int) -> None:
        """Drop idle connections to a replica about to restart, so that it can stop at once."""
        close_idle = getattr(self._transports[replica], "close_idle", None)
        if close_idle is not None:
            close_idle()

    def release(self, replica: int) -> None:
        self._held[replica] = False
        self._notify()

    def lost(self, replica: int, adapter: str) -> None:
        """The replica no longer has this version: stop forwarding it there and let the lifecycle reload it."""
        if self._serving[replica].pop(adapter, None) is not None:
            self._recovering.add(adapter)
            if self.on_replica_change is not None:
                self.on_replica_change(replica)

    # --- adapter operations (the lifecycle calls these; kinds without adapters refuse them) ---------------

    def serve(self, replica: int, adapters: Mapping[str, AdapterFiles]) -> None:
        self._serving[replica] = dict(adapters)
        self._recovering.difference_update(adapters)
        self._notify()

    def expect(self, adapter: str) -> None:
        """A version about to be loaded: its requests wait for it (bounded) instead of failing at once."""
        self._recovering.add(adapter)

    def forget(self, adapter: str) -> None:
        """A version retired everywhere: nobody waits for it any more."""
        self._recovering.discard(adapter)

    def serving(self, replica: int) -> dict[str, AdapterFiles]:
        return self._serving[replica]

    def replica_up(self) -> list[bool]:
        return list(self._up)

    def set_replica_up(self, replica: int, up: bool) -> None:
        """A supervisor saw the replica's process die or come back: route around it now, not at the next health
        check (a down replica is tried only when every replica is down)."""
        self._up[replica] = up

    def in_flight(self) -> list[int]:
        return list(self._busy)

    def adapter_in_flight(self, adapter: str) -> int:
        return self._adapter_busy.get(adapter, 0)

    def retirements(self) -> list[tuple[str, int]]:
        """Self-hosted models do not retire; the hosted driver knows its sunset dates."""
        return []
    def adapter_requests(self, adapter: str) -> int:
        return self._adapter_requests.get(adapter, 0)

    async def list_adapters(self, replica: int) -> list[LoadedAdapter]:
        return []

    async def load_adapter(self, replica: int, name: str, files: AdapterFiles, pinned: bool = False) -> None:
        raise UnsupportedFeatureError(f"Backend '{self.name}' ({self.kind}) cannot load adapters at run time.",
                                      backend=self.name)

    async def unload_adapter(self, replica: int, name: str) -> None:
        raise UnsupportedFeatureError(f"Backend '{self.name}' ({self.kind}) cannot unload adapters at run time.",
                                      backend=self.name)

    async def probe(self, replica: int, adapter: str | None, files: AdapterFiles | None = None) -> str:
        """A short greedy completion on one replica, with `adapter` or the base model: the verification
        step compares it with the base model's and with itself."""
        request = BackendRequest(path=COMPLETIONS_PATH, body={"prompt": PROBE_PROMPT, "max_tokens": PROBE_TOKENS,
                                 "temperature": 0.0, "top_p": 1.0, "seed": 0}, model="probe", route="probe",
                                 adapter=adapter, thinking=False)
        upstream = await self._post(replica, request)
        raw = await upstream.read()
        if upstream.status >= 300:
            raise self.replica_error(replica, upstream.status, upstream.headers, raw[:MAX_ERROR_BODY])
        try:
            choices = orjson.loads(raw)["choices"]
            return str(choices[0].get("text") or "")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendProtocolError("the probe's reply is not a completion", backend=self.name) from exc

    async def health(self) -> bool:
        came_up = False
        for index, transport in enumerate(self._transports):
            up = await self._probe(transport)
            came_up |= up and not self._up[index]
            self._up[index] = up
            if up and self._discover_limits and self._limits[index] == NO_LIMIT:
                await self._discover_limit(index)
        if came_up:
            self._capacity()
        return any(self._up)

    async def _probe(self, transport) -> bool:
        """Its own connection and timeout (`transport.probe`): never queued behind data-plane streams."""
        try:
            return await transport.probe(self.health_path, self.headers()) < 300
        except BackendError:
            return False

    async def get_json(self, transport, path: str) -> object:
        """A control-plane GET; an error status becomes BackendUnavailableError, a body that is not JSON
        BackendProtocolError. A connection check that saw a changed server has already taken note: ask again."""
        try:
            response = await transport.request("GET", path, b"", self.headers())
        except ServerChangedError:
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

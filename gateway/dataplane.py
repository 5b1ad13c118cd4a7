"""The hot path as plain ASGI: auth -> read body -> orjson -> check -> route -> sampling -> driver -> relay.

No FastAPI routing and no pydantic here (reference/hot-path.md: FastAPI's request handling alone costs
more than a whole lean forward). One call per step; the steps live in their own modules.
"""
from __future__ import annotations

import asyncio
import logging
from functools import partial

import orjson

from backends.base import BackendRequest, forwarded_request
from backends.generations import normalise_history
from backends.errors import AdapterNotReadyError, BackendError, BackendRejectedError, UnsupportedFeatureError
from backends.protocol import CHAT_PATH, COMPLETIONS_PATH, known_fields
from gateway.access_log import write_access_line
from gateway.agents import AgentSupport
from gateway.auth import authenticate
from gateway.config import MAX_DEADLINE_MS
from gateway.errors import (
    DrainingError,
    GatewayError,
    GatewayTimeoutError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    from_backend_error,
)
from gateway.logs import REQUEST_ID
from gateway.metrics import QueueRecorder, RequestRecorder
from gateway.policies.admission import PRIORITIES, AdmissionQueue, priority_of
from gateway.policies.content import ImagePolicy, MessageLimits
from gateway.policies.ratelimit import RateLimiter
from gateway.policies.retry import retry_after, with_retries
from gateway.policies.sampling import apply_sampling_policy
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import request_id_of
from gateway.routing import Resolved, Target
from gateway.state import GatewayState
from gateway.streaming import DisconnectWatcher, StreamHead, relay_stream
from gateway.tracing import TRACEPARENT, incoming_traceparent
from gateway.validation import check_request

log = logging.getLogger(__name__)
JSON_HEADERS = [(b"content-type", b"application/json")]
STICKY_HEADER = b"x-kimi-sticky-key"
VARIANT_HEADER = b"x-kimi-variant"
DEADLINE_HEADER = b"x-kimi-deadline-ms"
PRIORITY_HEADER = b"x-kimi-priority"
CLOSE = (b"connection", b"close")
SERVER_TIMING = b"server-timing"
SAMPLING_ENFORCED, SAMPLING_DEFAULT = (b"x-kimi-sampling", b"enforced"), (b"x-kimi-sampling", b"default")


class ClientGone(Exception):
    """The client hung up before its request body arrived."""


class Forwarded:
    """A backend reply that passed its first byte, with where it came from."""

    __slots__ = ("reply", "target", "first", "events")

    def __init__(self, reply, target: Target, first: bytes | None = None, events=None) -> None:
        self.reply, self.target, self.first, self.events = reply, target, first, events


class DataPlane:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.limits = limits = state.config.limits
        self.max_body = limits.max_body_bytes
        self.message_limits = MessageLimits(limits.max_messages, limits.max_tokens)   # read per request
        self.sampling = state.config.sampling
        self.rate_limiter = state.shared.limiter        # in process, or Redis for a fleet (gateway/shared.py)
        # in process: checked with a plain call (no coroutine per request)
        self.rate_check = self.rate_limiter.check if isinstance(self.rate_limiter, RateLimiter) else None
        self.retry_policies = {backend.name: backend.retry for backend in state.config.backends}
        self.agents = AgentSupport(state.config.reasoning_memory, state.shared.memory)
        self.tracer = state.tracer
        self.include_prompts = state.config.logging.include_prompts
        self.images = ImagePolicy(limits)
        self.facts = state.experiments.facts
        forwarded = frozenset(limits.forward_fields)
        self.allowed = {path: None if limits.unknown_fields == "forward" else known_fields(path) | forwarded
                        for path in (CHAT_PATH, COMPLETIONS_PATH)}
        self.admission = admission = state.config.admission
        self.queues = {name: self._queue(name, driver, admission) for name, driver in state.drivers.items()}
        self.target_headers: dict[tuple[str, str | None], tuple] = {}   # x-kimi-backend/-adapter, encoded once
        self.loop: asyncio.AbstractEventLoop | None = None   # the loop requests ran on last (DisconnectWatcher)
        self.active = 0  # data-plane requests in flight: the SIGTERM drain waits for them (gateway/shutdown.py)

    def _queue(self, name: str, driver, admission) -> AdmissionQueue:
        queue = AdmissionQueue(name, driver.reserve, driver.has_room, max_length=admission.max_queue,
                               retry_after_s=admission.retry_after_s, events=QueueRecorder(self.state.metrics, name))
        driver.on_capacity = queue.dispatch
        driver.on_ejection = partial(self._ejection_changed, name, driver)
        return queue

    def _ejection_changed(self, name: str, driver, replica: int, ejected: bool) -> None:
        self.state.fleet.ejection(name, ejected, sum(driver.outliers.ejected))

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        request_id = request_id_of(headers.get(REQUEST_ID_HEADER))
        REQUEST_ID.set(request_id)  # on every log line written while serving it (gateway/logs.py)
        recorder = RequestRecorder(self.state.metrics, self.facts, request_id)
        traceparent = headers.get(TRACEPARENT)
        recorder.traceparent = incoming_traceparent(traceparent) if traceparent is not None else None
        span = None
        if self.tracer is not None:
            span = self.tracer.start(scope["path"], recorder.traceparent)
            recorder.traceparent = self.tracer.traceparent(span) or recorder.traceparent
        extra: list[tuple[bytes, bytes]] = [(REQUEST_ID_HEADER, request_id.encode())]
        code, usage, watcher, body, doc, principal = 500, None, None, None, None, None
        self.active += 1
        try:
            if self.state.refusing:
                raise DrainingError()
            # The key first, from the headers: an unauthenticated client gets nothing buffered for it.
            principal = authenticate(headers.get(b"authorization"), self.state.client_keys)
            recorder.key = principal.name
            body = await read_body(receive, self.max_body)
            doc = parse_body(body)
            watcher = DisconnectWatcher(receive, self.loop, scope)
            self.loop = watcher.loop
            code, usage = await self.serve(scope["path"], doc, len(body), principal, headers, request_id,
                                           recorder, extra, send)
        except ClientGone:
            code = 499
        except GatewayError as exc:
            if body is None:  # refused before its body was read (401, 413): close rather than drain the rest
                extra.append(CLOSE)
            extra.append((SERVER_TIMING, recorder.server_timing()))
            if recorder.variant is not None and not any(name == VARIANT_HEADER for name, _ in extra):
                extra.append((VARIANT_HEADER, recorder.variant.encode()))  # an error answer says its variant too
            code = await send_error(send, exc, extra)
        except asyncio.CancelledError:
            code = 499  # nginx's "client closed request": nothing is left to answer
            if watcher is None or not watcher.disconnected:
                raise
            asyncio.current_task().uncancel()
        except Exception:
            log.exception("request %s failed", request_id)
            extra.append((SERVER_TIMING, recorder.server_timing()))
            code = await send_error(send, InternalError(request_id), extra)
        finally:
            self.active -= 1
            if watcher is not None:
                watcher.stop()
            recorder.finished(code, usage)
            self.observed(recorder, span, scope["path"], principal, doc)

    def observed(self, recorder: RequestRecorder, span, path: str, principal, doc) -> None:
        """The request's span and access-log line, once its metrics are recorded."""
        doc = doc if isinstance(doc, dict) else None
        if span is not None:
            driver = self.state.drivers.get(recorder.backend)
            self.tracer.end(span, recorder, doc, driver.kind if driver is not None else None)
        write_access_line(recorder, path, principal.name if principal is not None else None,
                          doc is not None and doc.get("stream") is True, doc, self.include_prompts)

    async def serve(self, path, doc, size, principal, headers, request_id, recorder, extra, send) -> tuple[int, dict | None]:
        request, resolved, decision = await self.admit(path, doc, size, principal, headers, request_id, recorder)
        head = StreamHead(send, extra) if request.stream else None
        try:
            forwarded = await self.forward(request, resolved, recorder, head)
        except GatewayError as exc:
            if head is None or not head.started:
                raise
            return await head.fail(exc), None  # queued long enough to have sent its head: an SSE error event
        extra += self.response_headers(forwarded.target, resolved, decision, request, recorder)
        if request.deadline is None:
            return await self.respond(request, forwarded, recorder, extra, request_id, send, head)
        try:
            async with asyncio.timeout_at(request.deadline):
                return await self.respond(request, forwarded, recorder, extra, request_id, send, head)
        except TimeoutError:
            error = GatewayTimeoutError("The request's deadline (x-kimi-deadline-ms or the route's timeout) passed.")
            if head is None or not head.started:
                raise error from None
            return await head.fail(error), forwarded.reply.usage

    async def respond(self, request, forwarded, recorder, extra, request_id, send, head) -> tuple[int, dict | None]:
        reply = forwarded.reply
        if request.stream:
            extra.append((SERVER_TIMING, recorder.server_timing()))
            code = await relay_stream(send, forwarded.first, forwarded.events, reply, recorder, extra, request_id, head)
            return code, reply.usage
        body = forwarded.first  # read in open_reply, where a failure could still be retried
        extra.append((SERVER_TIMING, recorder.server_timing()))
        headers = JSON_HEADERS + extra
        headers.append((b"content-length", str(len(body)).encode()))  # not chunked: one framing, no terminator
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return 200, reply.usage

    async def admit(self, path, doc, size, principal, headers, request_id, recorder):
        """Every check and policy, in order; returns the BackendRequest to forward."""
        state = self.state
        has_images = check_request(doc, path, self.allowed[path], self.message_limits)  # limits, agent fields too
        model = doc["model"]
        principal.require(model)
        if principal.rpm or principal.tpm:
            if self.rate_check is not None:
                self.rate_check(principal, size, doc.get("max_tokens") or doc.get("max_completion_tokens"))
            else:
                await self.rate_limiter.admit(principal, size,
                                              doc.get("max_tokens") or doc.get("max_completion_tokens"))
        resolved = state.routes.plain(model)
        if resolved is None:  # an experiment (or no such route): only then is its sticky key asked for
            resolved = state.routes.resolve(model, partial(sticky_key, doc=doc, headers=headers, principal=principal))
        recorder.variant = resolved.variant
        route = resolved.route
        if has_images:
            await self.images.apply(doc, route.image_urls or self.limits.image_urls)
        decision = apply_sampling_policy(doc, self.sampling, route.profile)
        recorder.route = model
        recorder.sampled(decision.overrides)
        if resolved.variant is not None:
            recorder.assigned(resolved.variant)
        stream = doc.get("stream", False)
        normalise_history(doc.get("messages"))  # `reasoning` -> `reasoning_content`, "" -> absent
        observer = None
        if "tools" in doc:
            if self.agents.shared:
                await self.agents.prefetch(doc, principal.name)
            observer = self.agents.prepare(doc, principal.name, recorder)
        priority_header, deadline_header = headers.get(PRIORITY_HEADER), headers.get(DEADLINE_HEADER)
        priority = PRIORITIES[principal.priority] if priority_header is None else \
            priority_of(principal.priority, priority_header)
        deadline = None if deadline_header is None and route.timeout_s is None and route.deadline_ms is None else \
            deadline_of(deadline_header, route)
        request = forwarded_request(path, doc, model, route.name, route.adapter, decision.thinking,
                                    sampling=decision.values, stream=stream, has_images=has_images,
                                    request_id=request_id, rules=route.rules, observer=observer,
                                    hide_usage_chunk=stream and ask_for_usage(doc), traceparent=recorder.traceparent,
                                    effort=decision.effort, tenant=principal.name, priority=priority, deadline=deadline)
        if resolved.variant is not None:
            recorder.after = state.shadows.pick(state.routes.get(model), request)
        return request, resolved, decision

    def response_headers(self, target, resolved, decision, request, recorder) -> list[tuple[bytes, bytes]]:
        named = self.target_headers.get((target.backend, target.adapter))
        if named is None:
            if len(self.target_headers) >= 4096:   # routes changed many times: names that may be gone
                self.target_headers.clear()
            named = self.target_headers[(target.backend, target.adapter)] = (
                (b"x-kimi-backend", target.backend.encode()), (b"x-kimi-adapter", (target.adapter or "").encode()))
        headers = [*named, SAMPLING_ENFORCED if decision.enforced else SAMPLING_DEFAULT]
        if resolved.variant is not None:
            headers.append((VARIANT_HEADER, resolved.variant.encode()))
        if request.adjustments:
            adjustments = list(dict.fromkeys(request.adjustments))
            headers.append((b"x-kimi-adjusted", ",".join(adjustments).encode()))
            for adjustment in adjustments:
                recorder.adjusted(adjustment)
        return headers

    async def forward(self, request: BackendRequest, resolved: Resolved, recorder: RequestRecorder,
                      head: StreamHead | None = None) -> Forwarded:
        """Try the route's targets in order (healthy ones first), retrying each before its first byte."""
        state, route, thinking = self.state, resolved.route, request.thinking
        unsupported: UnsupportedFeatureError | None = None
        failure: BackendError | None = None
        healthy = state.healthy
        targets = route.targets if len(route.targets) == 1 else \
            sorted(route.targets, key=lambda t: not healthy.get(t.backend, True))
        for index, target in enumerate(targets):
            driver = state.drivers[target.backend]
            # A driver may adapt these to its backend's rules; each target starts from the client's request.
            request.adapter, request.thinking, request.adjustments = target.adapter, thinking, []
            request.avoid = []
            try:
                driver.check(request)
            except UnsupportedFeatureError as exc:
                unsupported = unsupported or exc
                continue
            if failure is not None:
                recorder.fell_back(route.name, target.backend)
            recorder.routed(request.model, target.name, target.backend, target.adapter)
            recorder.upstream_started()
            try:
                return await self.attempt(driver, request, route.name, target, recorder, head)
            except OverloadedError:
                if index == len(targets) - 1 or past(request.deadline):
                    raise
                failure = failure or BackendError(f"backend '{target.backend}' is at capacity", backend=target.backend)
            except BackendRejectedError as exc:
                if exc.status < 500:
                    raise from_backend_error(exc) from exc
                failure = exc
            except BackendError as exc:
                log.warning("backend %s failed for %s: %s", target.backend, request.request_id, exc.message)
                failure = exc
            finally:
                recorder.upstream_done()
        if failure is not None:
            raise from_backend_error(failure)
        raise from_backend_error(unsupported or UnsupportedFeatureError(f"Route '{route.name}' has no target."))

    async def attempt(self, driver, request: BackendRequest, route_name: str, target: Target,
                      recorder: RequestRecorder, head: StreamHead | None = None) -> Forwarded:
        """One target: a slot first (the admission queue, when its replicas are full), then the request with
        its retries, all within the request's deadline."""
        queue = self.queues[target.backend]
        lease = queue.try_now(request.adapter)
        if lease is None:
            lease = await queue.wait(request.adapter, request.tenant, request.priority, request.deadline,
                                     head.keepalive if head is not None else None, self.admission.keepalive_s)
        request.lease = lease  # driver.send() takes it before anything else (no await in between)
        if request.deadline is None:  # send_with_retries, inline: the common case is one await deep
            try:
                return await open_reply(driver, request, target)
            except BaseException as exc:
                failure = exc
            return await self.retry(failure, driver, request, route_name, target, recorder)
        try:
            async with asyncio.timeout_at(request.deadline):
                return await self.send_with_retries(driver, request, route_name, target, recorder)
        except TimeoutError:
            raise GatewayTimeoutError("The request's deadline (x-kimi-deadline-ms or the route's timeout) passed "
                                      "before the backend answered.") from None

    async def send_with_retries(self, driver, request: BackendRequest, route_name: str, target: Target,
                                recorder: RequestRecorder) -> Forwarded:
        """Retries before the first byte, within the backend's retry budget. A version swapped out while the
        request waited for its backend (a drained restart) is answered by the route's active version, never a 503."""
        try:
            return await open_reply(driver, request, target)
        except BaseException as exc:
            failure = exc
        return await self.retry(failure, driver, request, route_name, target, recorder)

    async def retry(self, failure: BaseException, driver, request: BackendRequest, route_name: str, target: Target,
                    recorder: RequestRecorder) -> Forwarded:
        """send_with_retries() once its first attempt failed with `failure`: that failure raised again when it
        is not worth a retry, else the remaining attempts. Nothing here runs for a request that succeeds."""
        policy = self.retry_policies[target.backend]
        count = partial(count_retry, recorder, target.backend)
        budget = driver.retry_budget
        allow = budget.try_retry if budget is not None else None
        try:
            return await retry_after(failure, partial(open_reply, driver, request, target), policy, count, allow)
        except AdapterNotReadyError:
            current = self.swapped(route_name, target)
            if current is None:
                raise
            request.adapter = current.adapter
            return await with_retries(partial(open_reply, driver, request, current), policy, count, allow)

    def swapped(self, route_name: str, target: Target) -> Target | None:
        """The same target in the current route table, when its adapter version changed since the request
        was routed (a swap flipped the route while the request waited for a drained restart)."""
        if target.adapter is None:
            return None
        route = self.state.routes.get(route_name)
        for current in route.targets if route is not None else ():
            if current.backend == target.backend and current.adapter != target.adapter:
                return current
        return None


def count_retry(recorder: RequestRecorder, backend: str, exc: BaseException) -> None:
    recorder.retried(backend, type(exc).__name__)


async def open_reply(driver, request: BackendRequest, target: Target) -> Forwarded:
    """Send, and pull a stream's first event or a whole non-stream body: until the client got a byte, a
    failure can still be retried (on another replica)."""
    reply = await driver.send(request)
    if not request.stream:
        try:
            return Forwarded(reply, target, await reply.read())
        finally:
            await reply.aclose()  # the slot is free as soon as the body is in hand
    events = reply.events()
    try:
        first = await anext(events)
    except StopAsyncIteration:
        await reply.aclose()
        raise BackendError("the backend sent an empty stream", backend=target.backend)
    except BaseException:
        await reply.aclose()
        raise
    return Forwarded(reply, target, first, events)


def past(deadline: float | None) -> bool:
    return deadline is not None and asyncio.get_running_loop().time() >= deadline


def deadline_of(header: bytes | None, route) -> float | None:
    """Event-loop time by which the request must be done: the earlier of `x-kimi-deadline-ms` (else the
    route's `deadline_ms`) and the route's `timeout_s`; None when neither bounds it."""
    budget_s = route.timeout_s
    milliseconds = route.deadline_ms if header is None else deadline_ms_of(header)
    if milliseconds is not None:
        budget_s = milliseconds / 1000 if budget_s is None else min(budget_s, milliseconds / 1000)
    return asyncio.get_running_loop().time() + budget_s


def deadline_ms_of(header: bytes) -> int:
    """`x-kimi-deadline-ms`: digits only (no sign, point, exponent or `_`), from 1 to MAX_DEADLINE_MS."""
    value = header.strip()
    if not value.isdigit() or not value.isascii():
        raise InvalidRequestError(f"{DEADLINE_HEADER.decode()} must be a whole number of milliseconds, from 1 to "
                                  f"{MAX_DEADLINE_MS}.", param=DEADLINE_HEADER.decode())
    if len(value) > len(str(MAX_DEADLINE_MS)) or not 1 <= int(value) <= MAX_DEADLINE_MS:
        raise InvalidRequestError(f"{DEADLINE_HEADER.decode()} must be from 1 to {MAX_DEADLINE_MS} ms (a day).",
                                  param=DEADLINE_HEADER.decode())
    return int(value)


def ask_for_usage(doc: dict) -> bool:
    """Ask the backend for stream usage (for token metrics) when the client did not; True means the
    usage chunk is the gateway's and must not reach the client."""
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    doc["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def sticky_key(sticky_by: str, doc: dict, headers: dict, principal) -> str | None:
    if sticky_by == "user":
        user = doc.get("user")
        return user if isinstance(user, str) and user else None
    if sticky_by == "header":
        value = headers.get(STICKY_HEADER)
        return value.decode("latin-1") if value else None
    return principal.name or None


def parse_body(body: bytes):
    """The client's JSON. Only this parse may answer "could not parse": a backend's bad JSON is a 502."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("We could not parse the JSON body of your request.") from None


async def read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_error(send, error: GatewayError, extra: list[tuple[bytes, bytes]]) -> int:
    body = error.body()
    headers = JSON_HEADERS + extra + [(k.encode(), v.encode()) for k, v in error.headers.items()]
    headers.append((b"content-length", str(len(body)).encode()))
    try:
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    except OSError:
        pass  # the client is gone
    return error.status_code

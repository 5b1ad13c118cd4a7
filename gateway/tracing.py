"""Request spans with OpenTelemetry, following the GenAI semantic conventions, exported by OTLP/HTTP.

Off unless the config has a `tracing:` block; then nothing here is even imported (`build_tracer` returns None
and the data plane's only cost is one `is None` test). Without tracing, an incoming W3C `traceparent` is still
forwarded to the backend unchanged (`incoming_traceparent`), so a backend's own traces join the caller's.

With tracing on, each data-plane request is one SERVER span named `{gen_ai.operation.name} {model}`, a child
of the caller's `traceparent` when there is one; the backend gets this span's context as its `traceparent`.
"""
from __future__ import annotations

import os
import re

TRACEPARENT = b"traceparent"
# W3C trace-context level 1: version-traceid-parentid-flags, lower-case hex; all-zero ids are invalid.
WELL_FORMED = re.compile(rb"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


def incoming_traceparent(value: bytes | None) -> str | None:
    """The caller's `traceparent` when well-formed (never forwarded otherwise: it would be a header injection)."""
    if value is not None and len(value) == 55 and WELL_FORMED.fullmatch(value):
        return value.decode("ascii")
    return None


def parse_headers(raw: str | None) -> dict[str, str]:
    """`Name=value,Other=value` (the OTEL_EXPORTER_OTLP_HEADERS form)."""
    headers = {}
    for part in (raw or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return headers


class RequestTracer:
    """Starts and ends one span per request; owns the SDK's provider (flushed on `shutdown`)."""

    def __init__(self, config, exporter=None) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers = parse_headers(os.environ.get(config.headers_env)) if config.headers_env else None
        exporter = exporter or OTLPSpanExporter(endpoint=config.endpoint, headers=headers, timeout=10)
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        # Batched export on the SDK's own thread: a slow collector never blocks a request.
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("kimi-gateway")
        self.propagator = TraceContextTextMapPropagator()
        self.server, self.error_status = SpanKind.SERVER, Status(StatusCode.ERROR)

    def start(self, path: str, traceparent: str | None):
        context = self.propagator.extract({"traceparent": traceparent}) if traceparent else None
        operation = OPERATIONS.get(path, "chat")
        return self.tracer.start_span(operation, context=context, kind=self.server,
                                      attributes={"gen_ai.operation.name": operation})

    def traceparent(self, span) -> str | None:
        """The span's context as the `traceparent` the backend gets."""
        carrier: dict[str, str] = {}
        from opentelemetry import trace

        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def end(self, span, recorder, doc: dict | None, provider: str | None) -> None:
        """The GenAI attributes (what was asked, what was used) and the gateway's own (adapter, variant, backend)."""
        if span.is_recording():
            attributes = {"http.response.status_code": recorder.code}
            if isinstance(doc, dict):
                model = doc.get("model")
                if isinstance(model, str):
                    attributes["gen_ai.request.model"] = model
                    span.update_name(f"{span.name} {model}")
                for field, key in (("max_tokens", "gen_ai.request.max_tokens"),
                                   ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p")):
                    value = doc.get(field)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        attributes[key] = value
            usage = recorder.usage or {}
            for field, key in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                               ("completion_tokens", "gen_ai.usage.output_tokens")):
                if isinstance(usage.get(field), int):
                    attributes[key] = usage[field]
            for key, value in (("gen_ai.provider.name", provider), ("kimi.route", recorder.route),
                               ("kimi.adapter", recorder.version or recorder.adapter),
                               ("kimi.variant", recorder.variant),
                               ("kimi.backend", recorder.backend), ("kimi.time_to_first_token_s", recorder.ttft_s),
                               ("kimi.upstream_s", recorder.upstream_s if recorder.backend else None),
                               ("kimi.overhead_s", recorder.overhead_s)):
                if value:
                    attributes[key] = value
            if recorder.code >= 500 or recorder.code == 499:
                attributes["error.type"] = str(recorder.code)
                span.set_status(self.error_status)
            span.set_attributes(attributes)
        span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()


def build_tracer(config) -> RequestTracer | None:
    tracing = config.tracing
    if tracing is not None and tracing.headers_env:   # named but not set: spans would go out without their auth
        from gateway.config import ConfigError, resolve_secret

        raw = resolve_secret(tracing.headers_env)
        if raw is None:
            raise ConfigError(f"tracing.headers_env: the environment variable {tracing.headers_env} (the "
                              "collector's headers) is not set")
        if not parse_headers(raw):
            raise ConfigError(f"tracing.headers_env: {tracing.headers_env} holds no `Name=value` header")
    return RequestTracer(tracing) if tracing is not None else None

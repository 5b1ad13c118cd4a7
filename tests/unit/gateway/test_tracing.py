"""Spans with tracing on: GenAI attributes, the caller's trace continued and handed to the backend, and a real
OTLP/HTTP export (protobuf) to a local collector stand-in."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backends.errors import BackendUnavailableError
from gateway.telemetry_config import TracingConfig
from gateway.tracing import RequestTracer, parse_headers
from tests.emulators.fake_driver import FakeDriver, Step
from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.app_client import running
from tests.unit.gateway.test_dataplane import CHAT, CONFIG, post, state_dir  # noqa: F401 (fixture)

TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def app_with(tracer: RequestTracer, one: FakeDriver):
    app = create_app(GatewayConfig.model_validate(CONFIG), drivers={"one": one, "two": FakeDriver("two")})
    app.state.tracer = app.data_plane.tracer = tracer   # as build_state does from a `tracing:` block
    return app


async def run_traced(steps, requests, exporter):
    one = FakeDriver("one", steps)
    tracer = RequestTracer(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces"), exporter=exporter)
    answers = []
    async with running(app_with(tracer, one)) as client:
        for body, headers in requests:
            answers.append(await client.post("/v1/chat/completions", content=orjson.dumps(body), headers=headers))
    tracer.provider.force_flush()
    tracer.shutdown()
    return one, answers


async def test_a_span_per_request_with_genai_attributes_continuing_the_callers_trace():
    exporter = InMemorySpanExporter()
    one, answers = await run_traced([Step()], [({**CHAT, "max_tokens": 5}, {"traceparent": TRACEPARENT})], exporter)
    (span,) = exporter.get_finished_spans()
    assert span.name == "chat kimi" and span.kind.name == "SERVER"
    assert format(span.context.trace_id, "032x") == TRACE_ID and format(span.parent.span_id, "016x") == PARENT_ID
    attributes = dict(span.attributes)
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == "kimi"
    assert attributes["gen_ai.usage.input_tokens"] == 3 and attributes["gen_ai.usage.output_tokens"] == 2
    assert attributes["gen_ai.request.max_tokens"] == 5 and attributes["kimi.backend"] == "one"
    assert attributes["http.response.status_code"] == 200 and attributes["gen_ai.provider.name"] == "fake"
    # the backend is handed this span's context: the same trace, this span as its parent
    assert one.requests[0].traceparent == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"


async def test_a_failed_request_is_an_error_span_and_a_new_trace_without_traceparent():
    exporter = InMemorySpanExporter()
    failing = [Step(error=BackendUnavailableError("down", backend="one"))] * 3
    _, answers = await run_traced(failing, [({**CHAT, "model": "ada"}, {})], exporter)
    (span,) = exporter.get_finished_spans()
    assert answers[0].status_code >= 500 and span.parent is None
    assert span.status.status_code.name == "ERROR" and span.attributes["error.type"] == str(answers[0].status_code)
    assert span.attributes["kimi.adapter"].startswith("ada@")


class Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        Collector.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    Collector.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_spans_reach_an_otlp_http_collector(collector, monkeypatch):
    monkeypatch.setenv("OTLP_HEADERS", "Authorization=Bearer t0ken-for-test")
    config = TracingConfig(endpoint=f"{collector}/v1/traces", service_name="gw-test", headers_env="OTLP_HEADERS")
    tracer = RequestTracer(config)
    async with running(app_with(tracer, FakeDriver("one"))) as client:
        await post(client, CHAT)
    tracer.shutdown()   # flushes
    (path, headers, body), = Collector.received
    assert path == "/v1/traces" and headers["authorization"] == "Bearer t0ken-for-test"
    export = ExportTraceServiceRequest.FromString(body)
    resource = export.resource_spans[0]
    assert {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"] == "gw-test"
    span = resource.scope_spans[0].spans[0]
    assert span.name == "chat kimi"
    assert {a.key: a.value.int_value for a in span.attributes}["gen_ai.usage.output_tokens"] == 2


def test_collector_headers_parse():
    assert parse_headers("a=1, b = two=2 ,,c") == {"a": "1", "b": "two=2"}


def test_a_tracing_endpoint_must_be_an_http_url():
    with pytest.raises(ValueError, match="OTLP/HTTP"):
        TracingConfig(endpoint="collector:4317")

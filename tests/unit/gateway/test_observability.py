"""Metrics, Server-Timing, access log, request ids on log lines and traces, with the app in process and scripted
fake drivers: /metrics after a known mix of requests matches it exactly; series known from config exist at zero
before the first request; random model names never add a series."""
import asyncio
import io
import logging
import random
import re
import string

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.errors import BackendAccountError, BackendUnavailableError
from gateway.logs import BackgroundHandler, JsonFormatter, RequestIdFilter
from tests.emulators.fake_driver import FakeDriver, Step
from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.app_client import running
from tests.unit.gateway.test_dataplane import CHAT, CONFIG, make_client, post, state_dir  # noqa: F401 (fixture)

STREAM = {**CHAT, "stream": True}
TIMING = re.compile(r"gateway;dur=\d+\.\d{3}(, upstream;dur=\d+\.\d{3})?")


async def samples(client, name: str) -> dict[tuple, float]:
    """One metric's samples: (sample name, sorted labels) -> value."""
    text = (await client.get("/metrics")).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(name):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def nonzero(found: dict) -> dict:
    return {key: value for key, value in found.items() if value}


def series(client_text: str) -> set[tuple]:
    return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(client_text)
            for s in f.samples}


def requests_key(route, adapter, version, backend, code):
    labels = {"route": route, "adapter": adapter, "version": version, "backend": backend, "code": code}
    return ("kimi_gateway_requests_total", tuple(sorted(labels.items())))


async def test_metrics_match_a_known_mix_of_requests_exactly():
    one = FakeDriver("one", [Step(), Step(), Step(),                                # kimi x3
                             Step(), Step(),                                        # ada stream x2
                             Step(fail_after=1, error_after=BackendUnavailableError("reset", backend="one")),
                             Step(error=BackendAccountError("key refused", backend="one"))])  # -> falls back to two
    two = FakeDriver("two")
    async with make_client(one, two) as client:
        for _ in range(3):
            assert (await post(client, CHAT)).status_code == 200
        for _ in range(2):
            ada = await post(client, {**STREAM, "model": "ada"})
            assert ada.status_code == 200
        failed = await post(client, STREAM)                     # fails after its first event: counts as 502
        assert failed.status_code == 200 and '"error"' in failed.text
        moved = await post(client, CHAT)
        assert moved.headers["x-kimi-backend"] == "two"
        assert (await post(client, {**CHAT, "model": "nope"})).status_code == 404
        assert (await post(client, b"{not json")).status_code == 400
        version = ada.headers["x-kimi-adapter"]
        requests = nonzero(await samples(client, "kimi_gateway_requests_total"))
        tokens = nonzero(await samples(client, "kimi_gateway_tokens_total"))
        ttft = await samples(client, "kimi_gateway_time_to_first_token_seconds_count")
        duration = await samples(client, "kimi_gateway_request_duration_seconds_count")
        fallbacks = nonzero(await samples(client, "kimi_gateway_fallbacks_total"))
        in_flight = await samples(client, "kimi_gateway_in_flight_requests")
        itl = nonzero(await samples(client, "kimi_gateway_inter_token_latency_seconds_count"))
    assert requests == {requests_key("kimi", "", "", "one", "200"): 3,
                        requests_key("ada", "ada", version, "one", "200"): 2,
                        requests_key("kimi", "", "", "one", "502"): 1,
                        requests_key("kimi", "", "", "two", "200"): 1,
                        requests_key("", "", "", "", "404"): 1,
                        requests_key("", "", "", "", "400"): 1}
    # The fake's non-stream replies report 3 prompt + 2 completion tokens; its streams report none.
    assert tokens == {("kimi_gateway_tokens_total", (("adapter", ""), ("kind", "prompt"), ("route", "kimi"))): 12,
                      ("kimi_gateway_tokens_total", (("adapter", ""), ("kind", "completion"), ("route", "kimi"))): 8}
    count = lambda found, **labels: found[next(k for k in found if dict(k[1]) == labels)]
    assert count(ttft, route="ada", backend="one") == 2 and count(ttft, route="kimi", backend="one") == 1
    assert count(ttft, route="kimi", backend="two") == 0
    assert count(duration, route="kimi", backend="one") == 4 and count(duration, route="kimi", backend="two") == 1
    assert count(duration, route="ada", backend="one") == 2
    assert fallbacks == {("kimi_gateway_fallbacks_total", (("backend", "two"), ("route", "kimi"))): 1}
    assert set(in_flight.values()) == {0}
    assert set(dict(k[1])["backend"] for k in itl) == {"one"}   # the streams that went on past their first event


async def test_series_known_from_config_exist_at_zero_before_any_request():
    async with make_client(FakeDriver("one"), FakeDriver("two")) as client:
        text = (await client.get("/metrics")).text
        version = (await post(client, {**CHAT, "model": "ada"})).headers["x-kimi-adapter"]
    present = series(text)
    for route, adapter, ver, backend in [("kimi", "", "", "one"), ("kimi", "", "", "two"),
                                         ("ada", "ada", version, "one"), ("ab", "ada", version, "one"),
                                         ("ab", "", "", "two")]:
        assert requests_key(route, adapter, ver, backend, "200") in present
        labels = (("backend", backend), ("le", "0.01"), ("route", route))
        assert ("kimi_gateway_time_to_first_token_seconds_bucket", labels) in present
    for variant in ("ada", "kimi"):
        assert ("kimi_gateway_experiment_assignments_total", (("experiment", "ab"), ("variant", variant))) in present
    assert ("kimi_gateway_adapter_operations_total", (("op", "swap"), ("result", "error"))) in present
    assert ("kimi_gateway_adapter_loaded", (("adapter", "ada"), ("backend", "one"))) in present
    assert ("kimi_gateway_adapter_active_version", (("adapter", "ada"), ("version", version))) in present
    assert ("kimi_gateway_reasoning_memory_total", (("result", "missed"), ("route", "kimi"))) in present
    assert ("kimi_gateway_fallbacks_total", (("backend", "two"), ("route", "kimi"))) in present
    assert ("kimi_gateway_backend_up", (("backend", "one"),)) in present
    assert all(value == 0 for key, value in (await _values(text)).items() if key[0].endswith(("_total", "_count")))


async def _values(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


async def test_ten_thousand_random_model_names_add_no_series():
    rng = random.Random(20)
    app = create_app(GatewayConfig.model_validate(CONFIG), drivers={"one": FakeDriver("one"), "two": FakeDriver("two")})
    async with running(app) as client:
        before = series((await client.get("/metrics")).text)
        for _ in range(10_000):   # straight into the ASGI app: httpx would triple the test's time
            name = "".join(rng.choices(string.ascii_letters + string.digits + "-_.:/@", k=rng.randint(1, 40)))
            assert await asgi_post(app, orjson.dumps({**CHAT, "model": name})) == 404
        after_text = (await client.get("/metrics")).text
    assert series(after_text) == before
    assert (await _values(after_text))[requests_key("", "", "", "", "404")] == 10_000


async def asgi_post(app, body: bytes) -> int:
    """One chat request through the app as uvicorn would hand it over; returns the status."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"content-type", b"application/json")], "query_string": b"", "server": ("127.0.0.1", 8080)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status, complete = [], asyncio.Event()

    async def receive():   # the body, then `http.disconnect` once the response is complete
        if messages:
            return messages.pop()
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif not message.get("more_body"):
            complete.set()
    await app(scope, receive, send)
    return status[0]


async def test_server_timing_on_every_answer():
    one = FakeDriver("one", [Step(), Step()])
    async with make_client(one, FakeDriver("two")) as client:
        answers = [await post(client, CHAT), await post(client, STREAM), await post(client, {**CHAT, "model": "nope"}),
                   await post(client, b"{"), await client.get("/healthz"), await client.get("/metrics")]
    for answer in answers:
        assert TIMING.fullmatch(answer.headers["server-timing"]), answer.headers["server-timing"]
    assert "upstream" in answers[0].headers["server-timing"] and "upstream" in answers[1].headers["server-timing"]
    assert "upstream" not in answers[2].headers["server-timing"]


@pytest.fixture
def log_lines():
    """Every log line the app writes, as the JSON handler of `serve` writes it."""
    stream = io.StringIO()
    handler = BackgroundHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    lines: list[dict] = []

    def read() -> list[dict]:
        handler.close()
        lines.extend(orjson.loads(line) for line in stream.getvalue().splitlines())
        return lines
    yield read
    root.removeHandler(handler)
    root.setLevel(old_level)


async def test_one_access_line_per_request_without_prompt_and_request_id_on_every_line(log_lines):
    one = FakeDriver("one", [Step(), Step(fail_after=1, error_after=BackendUnavailableError("reset", backend="one"))])
    async with make_client(one, FakeDriver("two")) as client:
        ok = await post(client, {**CHAT, "messages": [{"role": "user", "content": "secret plan"}]})
        failed = await post(client, STREAM)
        missing = await post(client, {**CHAT, "model": "nope"})
    lines = log_lines()
    access = [line for line in lines if line["logger"] == "kimi_gateway.access"]
    assert [line["request_id"] for line in access] == [r.headers["x-request-id"] for r in (ok, failed, missing)]
    first = access[0]
    assert first["route"] == "kimi" and first["backend"] == "one" and first["status"] == 200
    assert first["prompt_tokens"] == 3 and first["completion_tokens"] == 2 and first["duration_ms"] > 0
    assert first["overhead_ms"] >= 0 and first["upstream_ms"] >= 0 and first["stream"] is False
    assert access[1]["status"] == 502 and access[1]["stream"] is True and access[1]["ttft_ms"] > 0
    assert access[2]["status"] == 404 and access[2]["route"] is None
    assert "secret plan" not in str(lines)
    stream_warning = next(line for line in lines if line["logger"] == "gateway.streaming")
    assert stream_warning["request_id"] == failed.headers["x-request-id"]


async def test_prompts_are_logged_only_when_the_config_opts_in(log_lines):
    logging_config = {"logging": {"include_prompts": True}}
    async with make_client(FakeDriver("one"), FakeDriver("two"), **logging_config) as client:
        await post(client, {**CHAT, "messages": [{"role": "user", "content": "secret plan"}]})
    access = [line for line in log_lines() if line["logger"] == "kimi_gateway.access"]
    assert access[0]["prompt"] == [{"role": "user", "content": "secret plan"}]


async def test_access_log_can_be_turned_off(log_lines):
    async with make_client(FakeDriver("one"), FakeDriver("two")) as client:
        logging.getLogger("kimi_gateway.access").disabled = True
        try:
            await post(client, CHAT)
        finally:
            logging.getLogger("kimi_gateway.access").disabled = False
    assert not [line for line in log_lines() if line["logger"] == "kimi_gateway.access"]


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("incoming, forwarded", [
    (TRACEPARENT, TRACEPARENT),
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nx: y", None),   # never a header injection
    ("00-00000000000000000000000000000000-b7ad6b7169203331-01", None),          # an invalid all-zero trace id
    ("garbage", None),
])
async def test_traceparent_is_forwarded_unchanged_when_tracing_is_off(incoming, forwarded):
    one = FakeDriver("one")
    async with make_client(one, FakeDriver("two")) as client:
        await client.post("/v1/chat/completions", content=orjson.dumps(CHAT),
                          headers={"traceparent": incoming.replace("\r\n", " ")})
    assert one.requests[0].traceparent == forwarded


def test_log_formats_carry_the_request_id_and_access_fields():
    from gateway.logs import REQUEST_ID, TextFormatter

    record = logging.LogRecord("kimi_gateway.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"route": "kimi", "status": 200, "variant": None}
    other = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, "backend %s failed", ("kt",), None)
    other.extra_field = 7
    token = REQUEST_ID.set("req-9")
    try:
        for item in (record, other):
            RequestIdFilter().filter(item)
    finally:
        REQUEST_ID.reset(token)
    text = TextFormatter().format(record)
    assert "[req-9]: request route=kimi status=200" in text and "variant" not in text
    line = orjson.loads(JsonFormatter().format(other))
    assert line["message"] == "backend kt failed" and line["request_id"] == "req-9" and line["extra_field"] == 7
    assert line["level"] == "warning" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


def test_configure_logging_replaces_handlers_and_switches_the_access_log():
    from gateway.logs import configure_logging
    from gateway.telemetry_config import LoggingConfig

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        handler = configure_logging(LoggingConfig(format="text", level="warning", access_log=False))
        assert root.handlers == [handler] and root.level == logging.WARNING
        assert logging.getLogger("kimi_gateway.access").disabled
        handler.close()
    finally:
        logging.getLogger("kimi_gateway.access").disabled = False
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_the_access_line_written_without_a_record_is_the_formatted_one():
    """configure_logging's JSON handler alone: the access line skips the LogRecord, and reads exactly as the
    JsonFormatter writes the record; another handler on the way sends it back through the record."""
    from types import SimpleNamespace

    from gateway.access_log import write_access_line
    from gateway.logs import REQUEST_ID, configure_logging
    from gateway.telemetry_config import LoggingConfig

    recorder = SimpleNamespace(usage={"prompt_tokens": 3, "completion_tokens": 2}, route="kimi", version="", adapter="a",
                               variant=None, backend="one", code=200, ttft_s=None, duration_s=0.0123456,
                               upstream_s=0.01, overhead_s=0.0023456)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    token = REQUEST_ID.set("req-7")
    try:
        handler = configure_logging(LoggingConfig())
        handler.stream = io.StringIO()
        assert handler.sole_json_for(logging.getLogger("kimi_gateway.access"))
        write_access_line(recorder, "/v1/chat/completions", "bench", False, {"messages": [1]}, True)
        direct = handler.pending[-1]
        other = logging.NullHandler()
        root.addHandler(other)     # now a record must be made: it goes through the formatter
        assert not handler.sole_json_for(logging.getLogger("kimi_gateway.access"))
        write_access_line(recorder, "/v1/chat/completions", "bench", False, {"messages": [1]}, True)
        formatted = handler.pending[-1]
        root.removeHandler(other)
        handler.close()
    finally:
        REQUEST_ID.reset(token)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    direct, formatted = orjson.loads(direct), orjson.loads(formatted)
    assert direct.pop("ts")[:16] == formatted.pop("ts")[:16]
    assert direct == formatted and list(direct) == list(formatted)
    assert direct["request_id"] == "req-7" and direct["adapter"] == "a" and direct["prompt"] == [1]


def test_direct_metric_writes_expose_what_the_children_methods_do():
    """Labeled.add/observe (the per-request writes) against prometheus_client's own inc/dec/observe: the same
    exposition, bucket edges, +Inf and NaN included."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from gateway.metrics import Labeled

    def collectors():
        registry = CollectorRegistry()
        return registry, (Counter("c", "c", ["a"], registry=registry), Gauge("g", "g", ["a"], registry=registry),
                          Histogram("h", "h", ["a"], buckets=(0.1, 1, 5), registry=registry))
    own, (counter, gauge, histogram) = collectors()
    theirs, (counter2, gauge2, histogram2) = collectors()
    counter, gauge, histogram = Labeled(counter), Labeled(gauge), Labeled(histogram)
    for label, amount in [("x", 1), ("x", 3), ("y", 0.5)]:
        counter.add((label,), amount)
        counter2.labels(label).inc(amount)
    gauge.add(("x",))
    gauge.add(("x",))
    gauge.add(("x",), -1.0)
    gauge2.labels("x").inc()
    for amount in (0.0, 0.1, 0.10001, 1, 4.99, 5, 7, 1e9, float("nan"), -2):
        histogram.observe(("x",), amount)
        histogram2.labels("x").observe(amount)
    assert generate_latest(own) == generate_latest(theirs)


@pytest.mark.parametrize("seed", range(3))
def test_the_access_line_as_text_is_the_line_orjson_writes(seed, monkeypatch):
    """access_json() + write_json_text() (the access line's path) against access_fields() + write_json(): the same
    line, byte for byte, for random recorders: None, odd token counts from a backend, names with quotes and
    non-ASCII, request ids that need escapes, durations from a microsecond to days."""
    from types import SimpleNamespace

    from gateway import logs
    from gateway.access_log import access_fields, access_json
    from gateway.logs import REQUEST_ID, BackgroundHandler, JsonFormatter

    rng = random.Random(seed)
    monkeypatch.setattr(logs.time, "time", lambda: 1764604800.123)
    handler = BackgroundHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    handler.close()   # the writer stopped: the lines stay in `pending`, compared there
    names = [None, "", "kimi", "k2@1a2b3c4d", 'a"b', "back\\slash", "é漢", "tab\there", "\x7f"]
    seconds = [None, 0.0, 1e-7, 0.0000015, 0.0123456, 3.5, 86400.123456789, 1e13, -0.0004]
    counts = [None, 0, 7, 2 ** 40, 2 ** 70, -3, 1.5, "12", True, [1], {"a": 1}]
    try:
        for _ in range(2000):
            recorder = SimpleNamespace(
                usage=rng.choice([None, {}, {"prompt_tokens": rng.choice(counts), "completion_tokens": rng.choice(counts)}]),
                route=rng.choice(names) or "", version=rng.choice(names) or "", adapter=rng.choice(names),
                variant=rng.choice(names), backend=rng.choice(names) or "", code=rng.choice([200, 499, 502]),
                ttft_s=rng.choice(seconds), duration_s=rng.choice(seconds), upstream_s=rng.choice(seconds[1:]),
                overhead_s=rng.choice(seconds))
            path, client, stream = rng.choice(["/v1/chat/completions", "/v1/completions"]), rng.choice(names), \
                rng.choice([True, False])
            token = REQUEST_ID.set(rng.choice([None, "0f1e2d3c4b5a69788796a5b4", "req-7", 'q"x', "ü"]))
            try:
                try:
                    handler.write_json("kimi_gateway.access", "request", access_fields(recorder, path, client, stream, None))
                except (TypeError, orjson.JSONEncodeError) as exc:   # a count orjson refuses: refused the same way,
                    try:                                                # or left to the fields' dict, which refuses it
                        assert access_json(recorder, path, client, stream) is None
                    except type(exc):
                        pass
                    continue
                text = access_json(recorder, path, client, stream)
                if text is None:   # an odd token count: the fields' dict is written (write_json, as above)
                    assert any(count.__class__ is not int for count in (recorder.usage or {}).values())
                    continue
                handler.write_json_text('"kimi_gateway.access"', '"request"', text)
            finally:
                REQUEST_ID.reset(token)
            assert handler.pending[-1] == handler.pending[-2], recorder
    finally:
        handler.pending.clear()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_recorder_series_expose_what_labels_writes_expose(seed, shared, monkeypatch):
    """RequestRecorder writes through per-combination series (Metrics.series) bound once: the exposition is what
    the same requests give written by prometheus_client's labels(…).inc()/observe(), and no series more (one is
    made at its first write: random requests, JSON and streams, fallbacks, answers without a route, odd usage).
    `shared`: the writes as with values in files shared between `--workers` (through the children's methods)."""
    from prometheus_client import generate_latest

    from gateway import metrics as metrics_module
    from gateway.metrics import Metrics, RequestRecorder

    if shared:   # no value counts as one written directly
        monkeypatch.setattr(metrics_module, "MutexValue", type("Shared", (), {}))

    rng = random.Random(seed)
    clock, now = iter(range(10 ** 6)), [0.0]

    def perf_counter() -> float:
        now[0] = next(clock) * 0.0137
        return now[0]
    monkeypatch.setattr(metrics_module.time, "perf_counter", perf_counter)
    ours, reference = Metrics(), Metrics()
    ref = {name: getattr(reference, name).collector for name in
           ("requests", "in_flight", "duration", "ttft", "overhead", "inter_token", "tokens")}
    for _ in range(300):
        recorder = RequestRecorder(ours)
        route, adapter, backend = rng.choice(["kimi", "k2"]), rng.choice([None, "a1"]), rng.choice(["up", "b2"])
        version = rng.choice([None, "a1@12345678"]) if adapter else None
        code = rng.choice([200, 200, 502, 499])
        usage = rng.choice([None, {}, {"prompt_tokens": rng.randint(0, 9), "completion_tokens": rng.randint(0, 40)},
                            {"prompt_tokens": "7", "completion_tokens": 2.0}])
        routed, stream, fallback = rng.random() < 0.85, rng.random() < 0.5, rng.random() < 0.2
        if routed:
            if fallback:   # routed twice
                recorder.routed(route, None, "other")
                ref["in_flight"].labels("other").inc(0)
            recorder.routed(route, adapter, backend, version)
            if stream:
                recorder.first_event()
                recorder.events(rng.randint(0, 5))
        else:
            recorder.route = rng.choice(["", route])
        recorder.finished(code, usage)
        # what the recorder's writes were, through prometheus_client's own methods
        labels = (recorder.route, recorder.adapter, recorder.version, recorder.backend, str(code))
        ref["requests"].labels(*labels).inc()
        if routed:
            ref["in_flight"].labels(backend).inc(0)
            ref["duration"].labels(route, backend).observe(recorder.duration_s)
            ref["overhead"].labels(route).observe(max(recorder.overhead_s, 0.0))
            if stream:
                ref["ttft"].labels(route, backend).observe(recorder.ttft_s)
                completion = (usage or {}).get("completion_tokens")
                gaps = completion - 1 if isinstance(completion, int) and completion > 1 else recorder._events
                if gaps > 0 and recorder._events > 0:
                    ref["inter_token"].labels(backend).observe((now[0] - recorder._first) / gaps)
        if usage:
            for kind in ("prompt", "completion"):
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int) and count > 0:
                    ref["tokens"].labels(recorder.route, recorder.adapter, kind).inc(count)
    assert generate_latest(ours.registry) == generate_latest(reference.registry)

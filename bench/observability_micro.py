"""What metrics, the access log and (disabled or enabled) tracing cost per request on the hot path, in µs of CPU,
with bench/dataplane_micro.py's in-process data plane (canned upstream, no HTTP server).

    python bench/observability_micro.py [--requests 20000] [--rounds 3] [--stream]

Variants, interleaved round by round (A B C D A B C D ...), medians of the rounds:
  bare       metrics recorded by a no-op recorder, access log off, tracing off: the hot path without observability
  metrics    the real recorder (the default), access log off, tracing off
  +access    and the JSON access log on (written by the background thread to /dev/null)
  +tracing   and tracing on (OTLP exporter replaced by one that drops spans: the SDK's own cost, not the network's)
Tracing off is in every variant but `+tracing`; its whole cost is one `is None` test and the `traceparent`
header lookup, measured alone at the end.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import timeit

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataplane_micro  # noqa: E402

from gateway import dataplane, metrics  # noqa: E402
from gateway.logs import BackgroundHandler, JsonFormatter, RequestIdFilter  # noqa: E402
from gateway.tracing import incoming_traceparent  # noqa: E402


class NullRecorder(metrics.RequestRecorder):
    """Keeps the timing fields (Server-Timing still needs them) but records no metric."""

    def routed(self, route, adapter, backend, version=None) -> None:
        self.route, self.adapter, self.backend = route, adapter or "", backend

    def sampled(self, overrides) -> None: ...
    def first_event(self) -> None: ...
    def event(self) -> None: ...
    def finished(self, code, usage=None) -> None:
        self.code = code


class DropSpans:
    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None: ...
    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def access_log(on: bool) -> BackgroundHandler | None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if not on:
        root.setLevel(logging.WARNING)
        return None
    handler = BackgroundHandler(open(os.devnull, "w"))
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def run_variant(name: str, requests: int, stream: bool) -> float:
    dataplane.RequestRecorder = NullRecorder if name == "bare" else metrics.RequestRecorder
    access_log(name in ("+access", "+tracing"))
    tracer = None
    if name == "+tracing":
        from gateway.telemetry_config import TracingConfig
        from gateway.tracing import RequestTracer
        tracer = RequestTracer(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces"), exporter=DropSpans())
    original = dataplane.DataPlane.__init__

    def init(self, state):
        state.tracer = tracer
        original(self, state)
    dataplane.DataPlane.__init__ = init
    try:
        return uvloop.run(dataplane_micro.run(requests, stream=stream, bare=True))
    finally:
        dataplane.DataPlane.__init__ = original
        if tracer is not None:
            tracer.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="relay a 32-event stream per request")
    args = parser.parse_args()
    names = ("bare", "metrics", "+access", "+tracing")
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            results[name].append(run_variant(name, args.requests, args.stream))
    access_log(False)
    medians = {name: statistics.median(values) for name, values in results.items()}
    what = "a 32-event stream" if args.stream else "a JSON reply"
    print(f"µs CPU per request relaying {what}, median of {args.rounds} interleaved rounds of {args.requests}:")
    previous = None
    for name in names:
        added = "" if previous is None else f"  (+{medians[name] - medians[previous]:.1f} µs)"
        rounds = ", ".join(f"{value:.1f}" for value in results[name])
        print(f"  {name:<9} {medians[name]:6.1f}{added}   rounds: {rounds}")
        previous = name
    components()


def best_us(fn, number: int = 20_000, repeat: int = 7) -> float:
    """CPU time (not wall: the machine is shared), min over repeats: the least-disturbed measure."""
    return min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)) / number * 1e6


def components() -> None:
    """Each piece alone, per request: what the end-to-end deltas above are made of."""
    from gateway.access_log import write_access_line
    from gateway.telemetry_config import TracingConfig
    from gateway.tracing import RequestTracer

    registry = metrics.Metrics()
    usage = {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}

    def forwarded() -> metrics.RequestRecorder:
        """What a request records up to its response head."""
        recorder = metrics.RequestRecorder(registry)
        recorder.route = "kimi"
        recorder.sampled(())
        recorder.routed("kimi", None, "up", None)
        recorder.upstream_started()
        recorder.upstream_done()
        recorder.server_timing()
        return recorder

    def json_request() -> None:
        forwarded().finished(200, usage)

    def stream_request() -> None:
        recorder = forwarded()
        recorder.first_event()
        recorder.events(32)
        recorder.finished(200, usage)

    done = metrics.RequestRecorder(registry)
    done.routed("kimi", None, "up", None)
    done.finished(200, usage)
    handler = access_log(True)
    access = best_us(lambda: write_access_line(done, "/v1/chat/completions", "team", False, None, False))
    access_log(False)
    access_off = best_us(lambda: write_access_line(done, "/v1/chat/completions", "team", False, None, False))
    tracer = RequestTracer(TracingConfig(endpoint="http://127.0.0.1:9/v1/traces"), exporter=DropSpans())
    doc = {"model": "kimi", "max_tokens": 16}

    def traced() -> None:
        span = tracer.start("/v1/chat/completions", None)
        tracer.traceparent(span)
        tracer.end(span, done, doc, "llamacpp")

    header = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with_header, without, off = {b"traceparent": header}, {}, None
    print("each piece alone (min of 7 repeats):")
    print(f"  metrics, JSON reply:           {best_us(json_request):6.2f} µs")
    print(f"  metrics, 32-event stream:      {best_us(stream_request):6.2f} µs")
    print(f"  access log line on:            {access:6.2f} µs   (off: {access_off:.2f} µs)")
    print(f"  tracing off, no traceparent:   "
          f"{best_us(lambda: (incoming_traceparent(without.get(b'traceparent')), off is None)):6.2f} µs")
    print(f"  tracing off, traceparent kept: "
          f"{best_us(lambda: (incoming_traceparent(with_header.get(b'traceparent')), off is None)):6.2f} µs")
    print(f"  tracing on (span, SDK only):   {best_us(traced, number=5_000):6.2f} µs")
    tracer.shutdown()
    if handler is not None:
        handler.close()


if __name__ == "__main__":
    main()

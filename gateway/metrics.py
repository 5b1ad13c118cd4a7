"""Every Prometheus collector of the gateway (DESIGN.md "Metrics"), and RequestRecorder, the one object
handlers record a request through. Labels come only from config/registry names: bounded cardinality.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "kimi_gateway_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Labeled:
    """A collector whose labelled children are looked up once: prometheus_client's labels() costs a few
    µs per call, and the hot path makes six of them per request. Labels are config names, so the cache
    is as bounded as the metric's cardinality."""

    __slots__ = ("collector", "_children")

    def __init__(self, collector) -> None:
        self.collector = collector
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.collector.labels(*values)
        return child


class Metrics:
    """The collectors, on a registry of their own so that several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Labeled(Counter(f"{PREFIX}requests", "Requests answered", ["route", "adapter", "backend", "code"],
                                registry=registry))
        self.duration = Labeled(Histogram(f"{PREFIX}request_duration_seconds", "Request duration, start to last byte",
                                  ["route", "backend"], buckets=LATENCY_BUCKETS, registry=registry))
        self.ttft = Labeled(Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to the first streamed event",
                              ["route", "backend"], buckets=LATENCY_BUCKETS, registry=registry))
        self.inter_token = Labeled(Histogram(f"{PREFIX}inter_token_latency_seconds", "Mean gap between streamed events",
                                     ["backend"], buckets=TOKEN_GAP_BUCKETS, registry=registry))
        self.tokens = Labeled(Counter(f"{PREFIX}tokens", "Tokens reported by backends", ["route", "adapter", "kind"],
                              registry=registry))
        self.in_flight = Labeled(Gauge(f"{PREFIX}in_flight_requests", "Requests being served", ["backend"], registry=registry))
        self.backend_up = Labeled(Gauge(f"{PREFIX}backend_up", "1 when the backend's health check passes", ["backend"],
                                registry=registry))
        self.adapter_loaded = Labeled(Gauge(f"{PREFIX}adapter_loaded", "1 when the adapter is usable on the backend",
                                    ["adapter", "backend"], registry=registry))
        self.adapter_operations = Labeled(Counter(f"{PREFIX}adapter_operations", "Adapter lifecycle operations",
                                          ["op", "result"], registry=registry))
        self.sampling_overrides = Labeled(Counter(f"{PREFIX}sampling_overrides", "Client sampling values replaced",
                                          ["route", "param"], registry=registry))
        self.retries = Labeled(Counter(f"{PREFIX}retries", "Retries before the first byte", ["backend", "reason"],
                               registry=registry))
        self.fallbacks = Labeled(Counter(f"{PREFIX}fallbacks", "Requests moved to the route's next target",
                                 ["route", "backend"], registry=registry))
        self.adjustments = Labeled(Counter(f"{PREFIX}request_adjustments", "Requests the gateway changed to satisfy a "
                                   "backend rule (x-kimi-adjusted)", ["route", "adjustment"], registry=registry))
        self.reasoning_memory = Labeled(Counter(f"{PREFIX}reasoning_memory", "Reasoning put back into tool-call history "
                                        "(restored) or not found (missed)", ["route", "result"], registry=registry))
        self.experiment_assignments = Labeled(Counter(f"{PREFIX}experiment_assignments", "Experiment variant picks",
                                              ["experiment", "variant"], registry=registry))
        # Traffic management (issue 17): the admission queue, outlier ejection, the SIGTERM drain.
        self.queue_time = Labeled(Histogram(f"{PREFIX}queue_time_seconds", "Time a request waited in the gateway's "
                                  "queue for a backend slot", ["backend", "outcome"], buckets=LATENCY_BUCKETS,
                                  registry=registry))
        self.queue_length = Labeled(Gauge(f"{PREFIX}queue_length", "Requests waiting for a backend slot", ["backend"],
                                    registry=registry))
        self.replica_ejections = Labeled(Counter(f"{PREFIX}replica_ejections", "Replicas ejected by outlier "
                                         "detection", ["backend"], registry=registry))
        self.replicas_ejected = Labeled(Gauge(f"{PREFIX}replicas_ejected", "Replicas ejected now", ["backend"],
                                        registry=registry))
        self.draining = Gauge(f"{PREFIX}draining", "SIGTERM drain: 0 serving, 1 draining (/readyz 503), "
                              "2 refusing new requests", registry=registry)


class QueueRecorder:
    """One backend's admission queue as metrics (gateway/policies/admission.py QueueEvents)."""

    __slots__ = ("_length", "_waited", "_metrics", "_backend")

    def __init__(self, metrics: Metrics, backend: str) -> None:
        self._metrics, self._backend = metrics, backend
        self._length = metrics.queue_length.labels(backend)

    def length(self, length: int) -> None:
        self._length.set(length)

    def waited(self, seconds: float, outcome: str) -> None:
        self._metrics.queue_time.labels(self._backend, outcome).observe(seconds)


class LifecycleRecorder:
    """The adapter lifecycle's events as metrics (adapters/lifecycle.py LifecycleEvents)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def adapter_operation(self, op: str, result: str) -> None:
        self._metrics.adapter_operations.labels(op, result).inc()

    def adapter_loaded(self, adapter: str, backend: str, loaded: bool) -> None:
        self._metrics.adapter_loaded.labels(adapter, backend).set(1 if loaded else 0)


class RequestRecorder:
    """started -> routed -> first_event -> finished, the last one always (in a `finally`)."""

    __slots__ = ("_metrics", "_start", "_first", "_events", "route", "adapter", "backend")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first = 0.0
        self._events = 0
        self.route = self.adapter = self.backend = ""

    def routed(self, route: str, adapter: str | None, backend: str) -> None:
        if self.backend:
            self._metrics.in_flight.labels(self.backend).dec()
        self.route, self.adapter, self.backend = route, adapter or "", backend
        self._metrics.in_flight.labels(backend).inc()

    def first_event(self) -> None:
        self._first = time.perf_counter()
        self._metrics.ttft.labels(self.route, self.backend).observe(self._first - self._start)

    def event(self) -> None:
        self._events += 1

    def finished(self, code: int, usage: dict | None = None) -> None:
        metrics, now = self._metrics, time.perf_counter()
        metrics.requests.labels(self.route, self.adapter, self.backend, str(code)).inc()
        if self.backend:
            metrics.in_flight.labels(self.backend).dec()
            metrics.duration.labels(self.route, self.backend).observe(now - self._start)
            if self._first and self._events > 1:
                metrics.inter_token.labels(self.backend).observe((now - self._first) / (self._events - 1))
        if usage:
            for kind in ("prompt", "completion"):
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int) and count > 0:
                    metrics.tokens.labels(self.route, self.adapter, kind).inc(count)

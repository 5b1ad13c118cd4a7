"""Every Prometheus collector of the gateway (DESIGN.md "Metrics"), and the recorders that are the only
writers: RequestRecorder (one per request), LifecycleRecorder (adapter lifecycle), FleetRecorder (backend
health). Labels come only from config/registry names, so cardinality is bounded: an unknown model name is
counted under route="" (docs/observability.md).

Adding a metric is one declaration in `Metrics.__init__` (`self._counter/_gauge/_histogram`) plus the recorder
method that writes it; `initialise()` puts the label combinations known from config at zero.
"""
from __future__ import annotations

import os
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client import values as prometheus_values
from prometheus_client.values import MutexValue

PREFIX = "kimi_gateway_"
# LLM latencies: a first token in 10 ms (cached prefix, small model) to a minute (long prefill on a busy box).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
# A whole request: a short completion to a 30-minute reasoning run.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
# Per output token: 1 ms (small model on a GPU) to 5 s (a CPU-offloaded MoE under load).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)
# The gateway's own time per request: tens of µs when lean, milliseconds when something is wrong.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5)
disable_created_metrics()   # no `_created` series: half the exposition, and nothing the dashboard reads
TOKEN_KINDS = ("prompt", "completion")
ADAPTER_OPS = ("add", "swap", "remove", "load", "validate")
ADAPTER_RESULTS = ("ok", "error", "invalid")
MEMORY_RESULTS = ("restored", "missed")


def multiprocess() -> bool:
    """prometheus-client's multiprocess mode (`serve --workers N` sets the directory; gateway/workers.py)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Labeled:
    """A collector whose labelled children are looked up once: prometheus_client's labels() costs a few
    µs per call. Labels are config names, so the cache is as bounded as the metric's cardinality.

    add() and observe() are the per-request writes (RequestRecorder, through cells: add_to() and observe_in()):
    they go to the child's value itself, without the child's checks and lock (`inc()` and `observe()` cost 4,500
    and 8,500 instructions; these a few hundred). Every data-plane metric is written by the event loop's thread
    alone, and /metrics reads a float that one store replaces, so the lock guards nothing there. With `--workers`
    (values in files shared between processes) they call the child's own methods."""

    __slots__ = ("collector", "_children", "_cells")

    def __init__(self, collector) -> None:
        self.collector = collector
        self._children: dict[tuple[str, ...], object] = {}
        self._cells: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.collector.labels(*values)
        return child

    def cell(self, values: tuple[str, ...]):
        """The value a counter's or gauge's child keeps (add_to() writes it); the child is made if new."""
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells[values] = self.labels(*values)._value
        return cell

    def histogram_cell(self, values: tuple[str, ...]) -> tuple:
        """A histogram child's sum, buckets and bounds (observe_in() writes them); the child is made if new."""
        cell = self._cells.get(values)
        if cell is None:
            child = self.labels(*values)
            cell = self._cells[values] = (child._sum, child._buckets, tuple(child._upper_bounds),
                                          child._sum.__class__ is MutexValue, child)
        return cell

    def add(self, values: tuple[str, ...], amount: float = 1.0) -> None:
        """labels(*values).inc(amount) of a counter or gauge (a negative amount: a gauge's dec())."""
        add_to(self.cell(values), amount)

    def observe(self, values: tuple[str, ...], amount: float) -> None:
        """labels(*values).observe(amount) of a histogram."""
        observe_in(self.histogram_cell(values), amount)


def add_to(cell, amount: float = 1.0) -> None:
    if cell.__class__ is MutexValue:
        cell._value += amount
    else:
        cell.inc(amount)


def observe_in(cell: tuple, amount: float) -> None:
    total, buckets, bounds, direct, child = cell
    if not direct or amount != amount:   # shared files, or NaN (no bucket counts it): the child's way
        child.observe(amount)
    elif (index := bisect_left(bounds, amount)) < len(bounds):   # the first bucket with amount <= bound
        total._value += amount
        buckets[index]._value += 1.0
    else:
        total._value += amount


class Series:
    """The per-request series of one route, adapter version and backend (RequestRecorder), found once per
    combination (Metrics.series) instead of by their labels at every write. Each is made on its first write,
    as labels() would make it then: the exposition is the same."""

    __slots__ = ("_metrics", "_labels", "codes", "in_flight", "duration", "ttft", "overhead", "inter_token",
                 "prompt", "completion", "direct")

    def __init__(self, metrics: Metrics, route: str, adapter: str, version: str, backend: str) -> None:
        self._metrics, self._labels = metrics, (route, adapter, version, backend)
        self.codes: dict[int, object] = {}   # status -> the requests counter's cell
        self.in_flight = self.duration = self.ttft = self.overhead = self.inter_token = None
        self.prompt = self.completion = None
        # the value class prometheus_client makes every child with (one per process): MutexValue unless values
        # live in files shared between `--workers` processes, whose writes go through the children's methods
        self.direct = prometheus_values.ValueClass is MutexValue

    def requests(self, code: int):
        cell = self.codes[code] = self._metrics.requests.cell((*self._labels, str(code)))
        return cell

    def bind(self, name: str):
        """The cell of one of the slots above, made now (the first write to it)."""
        metrics, (route, adapter, _, backend) = self._metrics, self._labels
        if name == "in_flight":
            cell = metrics.in_flight.cell((backend,))
        elif name == "inter_token":
            cell = metrics.inter_token.histogram_cell((backend,))
        elif name == "overhead":
            cell = metrics.overhead.histogram_cell((route,))
        elif name in ("prompt", "completion"):
            cell = metrics.tokens.cell((route, adapter, name))
        else:   # duration, ttft
            cell = getattr(metrics, name).histogram_cell((route, backend))
        setattr(self, name, cell)
        return cell

    def finished(self, code: int, duration: float, overhead: float, streamed: float | None, events: int,
                 usage: dict | None) -> None:
        """A request's writes as it ends (RequestRecorder.finished): its status, one in flight less, its duration
        and the gateway's own time (`overhead`, at least 0), the mean gap between output tokens (`streamed`: first
        event to end, None without one), the tokens the backend reported. Direct: each value's float, bucket by
        bisect (the values are differences of perf_counter() readings: never NaN, which observe_in() sees to)."""
        prompt = completion = None
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        per_token = None
        if streamed is not None and events > 0:
            # Per output token when the backend reported them (no chunk parsing: the usage chunk is read anyway);
            # else per streamed event, which is one token per event on SGLang and llama.cpp.
            gaps = completion - 1 if isinstance(completion, int) and completion > 1 else events
            if gaps > 0:
                per_token = streamed / gaps
        prompt = prompt if isinstance(prompt, int) and prompt > 0 else None
        completion = completion if isinstance(completion, int) and completion > 0 else None
        if not self.direct:
            self._finished_shared(code, duration, overhead, per_token, prompt, completion)
            return
        (self.codes.get(code) or self.requests(code))._value += 1.0
        self.in_flight._value -= 1.0
        total, buckets, bounds, _, _ = self.duration or self.bind("duration")
        total._value += duration
        buckets[bisect_left(bounds, duration)]._value += 1.0
        total, buckets, bounds, _, _ = self.overhead or self.bind("overhead")
        total._value += overhead
        buckets[bisect_left(bounds, overhead)]._value += 1.0
        if per_token is not None:
            total, buckets, bounds, _, _ = self.inter_token or self.bind("inter_token")
            total._value += per_token
            buckets[bisect_left(bounds, per_token)]._value += 1.0
        if prompt is not None:
            (self.prompt or self.bind("prompt"))._value += prompt
        if completion is not None:
            (self.completion or self.bind("completion"))._value += completion

    def _finished_shared(self, code: int, duration: float, overhead: float, per_token: float | None,
                         prompt: int | None, completion: int | None) -> None:
        """finished() through the children's methods (values in files shared between processes)."""
        add_to(self.codes.get(code) or self.requests(code))
        add_to(self.in_flight, -1.0)
        observe_in(self.duration or self.bind("duration"), duration)
        observe_in(self.overhead or self.bind("overhead"), overhead)
        if per_token is not None:
            observe_in(self.inter_token or self.bind("inter_token"), per_token)
        if prompt is not None:
            add_to(self.prompt or self.bind("prompt"), prompt)
        if completion is not None:
            add_to(self.completion or self.bind("completion"), completion)


class Metrics:
    """The collectors, on a registry of their own so that several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[tuple[str, str, str, str], Series] = {}
        c, g, h = self._counter, self._gauge, self._histogram
        # traffic
        self.requests = c("requests", "Requests answered, by the adapter version (name@hash8) that served them",
                          "route", "adapter", "version", "backend", "code")
        self.duration = h("request_duration_seconds", "Request duration, start to last byte", DURATION_BUCKETS,
                          "route", "backend")
        self.ttft = h("time_to_first_token_seconds", "Request start to the first streamed event", TTFT_BUCKETS,
                      "route", "backend")
        self.inter_token = h("inter_token_latency_seconds", "Mean gap between output tokens of a stream",
                             ITL_BUCKETS, "backend")
        self.overhead = h("overhead_seconds", "The gateway's own time in a request (all but the upstream's)",
                          OVERHEAD_BUCKETS, "route")
        self.tokens = c("tokens", "Tokens reported by backends", "route", "adapter", "kind")
        self.in_flight = g("in_flight_requests", "Requests being served", "livesum", "backend")
        # policies and failures
        self.sampling_overrides = c("sampling_overrides", "Client sampling values replaced", "route", "param")
        self.retries = c("retries", "Retries before the first byte", "backend", "reason")
        self.fallbacks = c("fallbacks", "Requests moved to the route's next target", "route", "backend")
        self.adjustments = c("request_adjustments", "Requests the gateway changed to satisfy a backend rule "
                             "(x-kimi-adjusted)", "route", "adjustment")
        self.reasoning_memory = c("reasoning_memory", "Reasoning put back into tool-call history (restored) or "
                                  "not found (missed)", "route", "result")
        # backends and adapters
        self.backend_up = g("backend_up", "1 when the backend's health check passes", "livemax", "backend")
        self.adapter_loaded = g("adapter_loaded", "1 when the adapter is usable on the backend", "livemax",
                                "adapter", "backend")
        self.adapter_version = g("adapter_active_version", "1 for the adapter version that takes traffic",
                                 "livemax", "adapter", "version")
        self.adapter_operations = c("adapter_operations", "Adapter lifecycle operations", "op", "result")
        self.hosted_model_retirement = g("hosted_model_retirement_days", "Days until a hosted model id in use is "
                                         "retired (negative: already retired)", "livemin", "backend", "model")
        # experiments
        self.experiment_assignments = c("experiment_assignments", "Experiment variant picks", "experiment", "variant")
        self.experiment_requests = c("experiment_requests", "Experiment requests answered, per variant",
                                     "experiment", "variant", "code")
        self.experiment_ttft = h("experiment_time_to_first_token_seconds", "Time to first token per variant",
                                 TTFT_BUCKETS, "experiment", "variant")
        self.experiment_weight = g("experiment_weight", "Variant weights in force", "livemax", "experiment", "variant")
        # experiments (gateway/experiments/): shadow calls, feedback, the canary guard, request facts
        self.shadow_calls = c("shadow_calls", "Shadow calls by result (ok, error, timeout, dropped: over its limits)",
                              "experiment", "variant", "result")
        self.feedback = c("feedback", "Feedback recorded (score or label)", "experiment", "variant", "kind")
        self.guard_events = c("experiment_guard_events", "Candidates the canary guard rolled back",
                              "experiment", "variant", "reason")
        self.facts_dropped = Counter(PREFIX + "request_facts_dropped", "Request facts not stored: the write queue "
                                     "was full", registry=self.registry)
        # traffic management: the admission queue, outlier ejection, the SIGTERM drain
        self.queue_time = h("queue_time_seconds", "Time a request waited in the gateway's queue for a backend slot",
                            TTFT_BUCKETS, "backend", "outcome")
        self.queue_length = g("queue_length", "Requests waiting for a backend slot", "livesum", "backend")
        self.replica_ejections = c("replica_ejections", "Replicas ejected by outlier detection", "backend")
        self.replicas_ejected = g("replicas_ejected", "Replicas ejected now", "livemax", "backend")
        self.draining = Gauge(PREFIX + "draining", "SIGTERM drain: 0 serving, 1 draining (/readyz 503), "
                              "2 refusing new requests", registry=self.registry, multiprocess_mode="livemax")
        # a fleet's shared state
        self.shared_degraded = c("shared_degraded", "Requests served without the shared Redis (ratelimit: this "
                                 "replica's share; memory: local only)", "what")

    def series(self, route: str, adapter: str, version: str, backend: str) -> Series:
        key = (route, adapter, version, backend)
        found = self._series.get(key)
        if found is None:
            if len(self._series) >= 4096:   # routes changed many times over: names that may be gone
                self._series.clear()
            found = self._series[key] = Series(self, route, adapter, version, backend)
        return found

    def _counter(self, name: str, doc: str, *labels: str) -> Labeled:
        return Labeled(Counter(PREFIX + name, doc, labels, registry=self.registry))

    def _gauge(self, name: str, doc: str, mode: str, *labels: str) -> Labeled:
        """`mode`: how `--workers` processes combine (prometheus-client multiprocess_mode)."""
        return Labeled(Gauge(PREFIX + name, doc, labels, registry=self.registry, multiprocess_mode=mode))

    def _histogram(self, name: str, doc: str, buckets, *labels: str) -> Labeled:
        return Labeled(Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry))

    def exposition(self) -> bytes:
        """The text /metrics serves: this process's registry, or with `--workers` every worker's (their files)."""
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def initialise(self, config, adapters=()) -> None:
        """Every label combination known from config and registry at zero, so that rate() and the dashboard
        have a series from the first scrape. `adapters`: ActiveAdapter (spec, label) of the registry."""
        from gateway.initial_series import initial_series   # the config walk lives beside, not here

        for collector, values in initial_series(config, adapters):
            getattr(self, collector).labels(*values)   # a labelled child is exposed, at zero, once it exists


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
    """The adapter lifecycle's events as metrics (adapters/lifecycle.py LifecycleEvents), and the admin API's."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def adapter_operation(self, op: str, result: str) -> None:
        self._metrics.adapter_operations.labels(op, result).inc()

    def adapter_loaded(self, adapter: str, backend: str, loaded: bool) -> None:
        self._metrics.adapter_loaded.labels(adapter, backend).set(1 if loaded else 0)


class FleetRecorder:
    """Backend health and the route table as metrics (gateway/state.py: the health loop, registry changes)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._versions: dict[str, str] = {}

    def routes_changed(self, config, active) -> None:
        """New series at zero for what the registry added; the version that takes traffic per adapter at 1,
        the one it replaced at 0. `active`: ActiveAdapter (spec, label) per adapter."""
        self._metrics.initialise(config, active)
        current = {item.spec.name: item.label for item in active}
        for name, label in self._versions.items():
            if current.get(name) != label:
                self._metrics.adapter_version.labels(name, label).set(0)
        for name, label in current.items():
            self._metrics.adapter_version.labels(name, label).set(1)
        self._versions = current

    def backend_up(self, backend: str, up: bool) -> None:
        self._metrics.backend_up.labels(backend).set(1 if up else 0)

    def hosted_model_retirement(self, backend: str, model: str, days: float) -> None:
        """Days until a hosted model id the backend uses is retired (backends/hosted_models.py)."""
        self._metrics.hosted_model_retirement.labels(backend, model).set(days)

    def ejection(self, backend: str, ejected: bool, now_ejected: int) -> None:
        """Outlier detection ejected (or readmitted) one of the backend's replicas."""
        if ejected:
            self._metrics.replica_ejections.labels(backend).inc()
        self._metrics.replicas_ejected.labels(backend).set(now_ejected)

    def draining(self, phase: int) -> None:
        """The SIGTERM drain (gateway/shutdown.py): 0 serving, 1 draining, 2 refusing."""
        self._metrics.draining.set(phase)

    def shared_degraded(self, what: str) -> None:
        """A request served without the fleet's Redis (gateway/shared.py)."""
        self._metrics.shared_degraded.labels(what).inc()


class ExperimentRecorder:
    """Experiments' events as metrics (gateway/experiments/service.py ExperimentEvents)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def facts_dropped(self, count: int) -> None:
        self._metrics.facts_dropped.inc(count)

    def guard_event(self, experiment: str, variant: str, reason: str) -> None:
        self._metrics.guard_events.labels(experiment, variant, reason).inc()

    def promoted(self, experiment: str, variant: str) -> None:
        self._metrics.adapter_operations.labels("promote", "ok").inc()

    def shadow_call(self, experiment: str, variant: str, result: str) -> None:
        self._metrics.shadow_calls.labels(experiment, variant, result).inc()

    def feedback(self, experiment: str, variant: str, kind: str) -> None:
        self._metrics.feedback.labels(experiment, variant, kind).inc()

    def weights(self, experiment: str, weights: dict[str, float]) -> None:
        total = sum(weights.values()) or 1
        for variant, weight in weights.items():
            self._metrics.experiment_weight.labels(experiment, variant).set(weight / total)


class RequestRecorder:
    """started -> routed -> upstream_* -> first_event -> finished, the last one always (in a `finally`).
    It also holds what the access log line and the Server-Timing header say (gateway/observe.py). With a fact
    log (gateway/experiments/facts.py), `finished` also hands it the request's facts, and then starts `after`
    (shadow calls that wait for the answer to be done)."""

    __slots__ = ("_metrics", "_series", "start", "_first", "_events", "route", "adapter", "version", "backend", "variant",
                 "upstream_s", "_upstream_start", "code", "usage", "ttft_s", "duration_s", "overhead_s",
                 "traceparent", "key", "request_id", "facts", "after")

    def __init__(self, metrics: Metrics, facts=None, request_id: str = "") -> None:
        self._metrics, self._series = metrics, None
        self.facts, self.request_id, self.key, self.after = facts, request_id, "", None
        self.start = time.perf_counter()
        self._first = 0.0
        self._events = 0
        self.route = self.adapter = self.version = self.backend = ""
        self.variant: str | None = None
        self.upstream_s = self._upstream_start = 0.0
        self.code = 0
        self.usage: dict | None = None
        self.ttft_s = self.duration_s = self.overhead_s = None
        self.traceparent: str | None = None   # what the backend gets (gateway/tracing.py)

    # --- routing and policies (each a metric of its own) ---------------------------------------------

    def routed(self, route: str, adapter: str | None, backend: str, version: str | None = None) -> None:
        if self.backend:
            add_to(self._series.in_flight, -1.0)
        self.route, self.adapter, self.version, self.backend = route, adapter or "", version or "", backend
        self._series = series = self._metrics.series(route, self.adapter, self.version, backend)
        cell = series.in_flight or series.bind("in_flight")
        if series.direct:
            cell._value += 1.0
        else:
            add_to(cell)

    def sampled(self, overrides) -> None:
        for param in overrides:
            self._metrics.sampling_overrides.add((self.route, param))

    def assigned(self, variant: str) -> None:
        self.variant = variant
        self._metrics.experiment_assignments.add((self.route, variant))

    def adjusted(self, adjustment: str) -> None:
        self._metrics.adjustments.add((self.route, adjustment))

    def fell_back(self, route: str, backend: str) -> None:
        self._metrics.fallbacks.add((route, backend))

    def retried(self, backend: str, reason: str) -> None:
        self._metrics.retries.add((backend, reason))

    def reasoning_memory(self, restored: int, missed: int) -> None:
        if restored:
            self._metrics.reasoning_memory.add((self.route, "restored"), restored)
        if missed:
            self._metrics.reasoning_memory.add((self.route, "missed"), missed)

    # --- time ------------------------------------------------------------------------------------------

    def upstream_started(self) -> None:
        self._upstream_start = time.perf_counter()

    def upstream_done(self) -> None:
        """Time spent waiting on backends (every attempt, retries included) counts as upstream time."""
        if self._upstream_start:
            self.upstream_s += time.perf_counter() - self._upstream_start
            self._upstream_start = 0.0

    def server_timing(self) -> bytes:
        """`Server-Timing` for the response head: the gateway's own time so far and the upstream's, in ms."""
        gateway = time.perf_counter() - self.start - self.upstream_s
        if self.backend:
            return b"gateway;dur=%.3f, upstream;dur=%.3f" % (gateway * 1e3, self.upstream_s * 1e3)
        return b"gateway;dur=%.3f" % (gateway * 1e3)

    def first_event(self) -> None:
        self._first = time.perf_counter()
        self.ttft_s = ttft = self._first - self.start
        series = self._series
        if series is not None:
            observe_in(series.ttft or series.bind("ttft"), ttft)
        else:
            self._metrics.ttft.observe((self.route, self.backend), ttft)
        if self.variant is not None:
            self._metrics.experiment_ttft.observe((self.route, self.variant), ttft)

    def events(self, count: int) -> None:
        """`count` more streamed events after the first (the relay counts them and says so once)."""
        self._events += count

    def finished(self, code: int, usage: dict | None = None) -> None:
        now = time.perf_counter()
        self.code, self.usage = code, usage
        self.duration_s = duration = now - self.start
        series = self._series   # bound by routed(): the series of the route, adapter version and backend
        if series is None:   # answered by the gateway alone: counted, and the log says so (no other metric)
            self.overhead_s = duration
            self._finished_unrouted(code, usage)
        else:
            first = self._first
            streamed = now - first if first else None
            self.overhead_s = overhead = duration - self.upstream_s - (streamed or 0.0)
            series.finished(code, duration, max(overhead, 0.0), streamed, self._events, usage)
        if self.variant is not None:
            self._metrics.experiment_requests.add((self.route, self.variant, str(code)))
        if self.facts is not None and self.route:
            first = self._first - self.start if self._first else self.duration_s
            self.facts.record(self.request_id, self.route, self.route if self.variant else None, self.variant,
                              self.version or None, self.backend or None, self.key, code, self.duration_s, first,
                              usage)
        if self.after is not None:
            self.after.start()

    def _finished_unrouted(self, code: int, usage: dict | None) -> None:
        metrics = self._metrics
        metrics.requests.add((self.route, self.adapter, self.version, self.backend, str(code)))
        if usage:
            for kind in ("prompt", "completion"):
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int) and count > 0:
                    metrics.tokens.add((self.route, self.adapter, kind), count)

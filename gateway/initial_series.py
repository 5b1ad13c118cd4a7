"""initial_series(config, adapters): the label combinations known before any request, from the config and the
adapter registry, so that every series the dashboard and the alerts query exists (at zero) from the first
scrape: routes x backends, adapters x backends, experiments x variants, lifecycle operations x results.

Only names from config and registry appear here, as on the hot path: the cardinality is what the operator wrote.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from backends import errors as backend_errors
from gateway.metrics import ADAPTER_OPS, ADAPTER_RESULTS, MEMORY_RESULTS, TOKEN_KINDS

SAMPLING_PARAMS = ("temperature", "top_p", "min_p")
# Answers given before a request has a route (bad body, auth, unknown model, too large, rate limit): route="".
UNROUTED_CODES = ("400", "401", "403", "404", "413", "429")
# Why a retry happened is the failure's class name (gateway/dataplane.py count_retry); these can be retried.
RETRY_REASONS = tuple(sorted(
    name for name, value in vars(backend_errors).items()
    if isinstance(value, type) and issubclass(value, backend_errors.BackendError)
    and value is not backend_errors.BackendError and name != "UnsupportedFeatureError"))


def route_targets(config, adapters: Sequence) -> dict[str, list[tuple[str, str, str]]]:
    """route name -> [(adapter name, version label, backend)], an experiment's variants' targets under its name."""
    labels = {active.spec.name: active.label for active in adapters}
    specs = {spec.name: spec for spec in config.adapters} | {active.spec.name: active.spec for active in adapters}
    table: dict[str, list[tuple[str, str, str]]] = {}
    for name, spec in specs.items():
        table[name] = [(name, labels.get(name, ""), backend) for backend in spec.backends]
    for route in config.routes:
        if route.targets is not None:
            table[route.name] = [("", "", backend) for backend in route.targets]
    for route in config.routes:
        if route.experiment is not None:
            table[route.name] = [t for variant in route.experiment.variants for t in table.get(variant, ())]
    return table


def initial_series(config, adapters: Sequence = ()) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(Metrics attribute, label values) for each series to put at zero."""
    backends = [backend.name for backend in config.backends]
    for code in UNROUTED_CODES:
        yield "requests", ("", "", "", "", code)
    for backend in backends:
        yield "in_flight", (backend,)
        yield "inter_token", (backend,)
        for reason in RETRY_REASONS:
            yield "retries", (backend, reason)
    for route, targets in route_targets(config, adapters).items():
        yield "overhead", (route,)
        for param in SAMPLING_PARAMS:
            yield "sampling_overrides", (route, param)
        if config.reasoning_memory.enabled:
            for result in MEMORY_RESULTS:
                yield "reasoning_memory", (route, result)
        for index, (adapter, version, backend) in enumerate(targets):
            yield "requests", (route, adapter, version, backend, "200")
            yield "duration", (route, backend)
            yield "ttft", (route, backend)
            for kind in TOKEN_KINDS:
                yield "tokens", (route, adapter, kind)
            if index:
                yield "fallbacks", (route, backend)
    for spec in {**{s.name: s for s in config.adapters}, **{a.spec.name: a.spec for a in adapters}}.values():
        for backend in spec.backends:
            yield "adapter_loaded", (spec.name, backend)
    for op in ADAPTER_OPS:
        for result in ADAPTER_RESULTS:
            yield "adapter_operations", (op, result)
    for route in config.routes:
        for variant in (route.experiment.variants if route.experiment else ()):
            yield "experiment_assignments", (route.name, variant)
            yield "experiment_requests", (route.name, variant, "200")
            yield "experiment_ttft", (route.name, variant)

"""RouteTable: a request's `model` -> the backends (and adapter) to try, in fallback order.

Every adapter is a route of its own name; an experiment route picks a variant by weight, sticky on a key.
The table is immutable: a registry change builds a new one and swaps the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from adapters.lifecycle import ActiveAdapter
from backends.base import DEFAULT_RULES, AgentRules
from gateway.config import ExperimentConfig, GatewayConfig, RouteConfig
from gateway.errors import ModelNotFoundError, ServiceUnavailableError
from gateway.experiments.split import Split


@dataclass(frozen=True, slots=True)
class Target:
    backend: str
    adapter: str | None           # the adapter version's label `name@hash8` (what the driver forwards), or None
    name: str | None = None       # the adapter's name (metrics)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[Target, ...]
    profile: str | None
    adapter: str | None = None
    experiment: ExperimentConfig | None = None
    rules: AgentRules = DEFAULT_RULES
    image_urls: str | None = None   # None = limits.image_urls
    split: Split | None = None      # an experiment's bucket ranges
    timeout_s: float | None = None  # the whole request, queue included
    deadline_ms: int | None = None  # the default for x-kimi-deadline-ms


@dataclass(frozen=True, slots=True)
class Resolved:
    route: Route              # the concrete (non-experiment) route that serves the request
    variant: str | None       # the experiment's chosen variant, if the model named an experiment


def pick_variant(experiment: str, variants: Mapping[str, float], key: str | None) -> str:
    """One pick without a prebuilt split (tests, tools); the route table keeps a Split per experiment."""
    return Split(experiment, variants).pick(key)


class RouteTable:
    def __init__(self, config: GatewayConfig, adapters: Sequence[ActiveAdapter] | None = None,
                 routes: Sequence[RouteConfig] | None = None,
                 weights: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """`adapters`: each adapter with the label of its active version (None: the config's, unversioned,
        for `kimi-gateway check`). `routes`: the routes in force (the config's with run-time changes applied;
        None: the config's). `weights`: an experiment's weights where adaptive allocation replaced them."""
        routes_by_name: dict[str, Route] = {}
        if adapters is None:
            adapters = [ActiveAdapter(spec, spec.name) for spec in config.adapters]
        for active in adapters:
            adapter = active.spec
            targets = tuple(Target(backend, active.label, adapter.name) for backend in adapter.backends)
            routes_by_name[adapter.name] = Route(adapter.name, targets, adapter.profile, adapter=adapter.name)
        for route in config.routes if routes is None else routes:
            targets = tuple(Target(backend, None) for backend in route.targets or ())
            rules = AgentRules(**route.agent.model_dump())
            split = None
            if route.experiment is not None:
                split = Split(route.name, (weights or {}).get(route.name) or route.experiment.variants)
            routes_by_name[route.name] = Route(route.name, targets, route.profile, experiment=route.experiment,
                                               rules=rules, image_urls=route.image_urls, split=split,
                                               timeout_s=route.timeout_s, deadline_ms=route.deadline_ms)
        self._routes = routes_by_name
        # A plain route resolves to itself: one Resolved per route, built here rather than per request.
        self._plain = {name: Resolved(route, None) for name, route in routes_by_name.items() if route.experiment is None}

    def names(self) -> list[str]:
        return list(self._routes)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def plain(self, model: str) -> Resolved | None:
        """A route that is not an experiment, resolved; None for an experiment or a name with no route."""
        return self._plain.get(model)

    def resolve(self, model: str, sticky_key: Callable[[str], str | None] | None = None) -> Resolved:
        """`sticky_key(sticky_by)` gives an experiment's key (user, header or API key); it is asked only
        when `model` names an experiment."""
        plain = self._plain.get(model)
        if plain is not None:
            return plain
        route = self._routes.get(model)
        if route is None:
            raise ModelNotFoundError(model)
        key = sticky_key(route.experiment.sticky_by) if sticky_key is not None else None
        variant = route.split.pick(key)
        chosen = self._routes.get(variant)
        if chosen is None or chosen.experiment is not None:   # the admin API refuses this; another writer may not
            raise ServiceUnavailableError(f"Experiment '{model}' picked '{variant}', which is not an adapter or a "
                                          "base route now; an admin must change the experiment.")
        # An experiment's agent rules apply to its variants, and so do its profile and image mode where it sets them.
        return Resolved(replace(chosen, profile=chosen.profile or route.profile, rules=route.rules,
                                image_urls=route.image_urls or chosen.image_urls,
                                timeout_s=route.timeout_s or chosen.timeout_s,
                                deadline_ms=route.deadline_ms or chosen.deadline_ms), variant)

"""Experiments: the one object the gateway holds for experiments. It owns the experiment store, the FactLog,
the shadow mirror, the routes changed at run time, the canary guard, adaptive allocation and promotion.

Routes in force = the config's routes with the store's run-time changes applied (`PUT /admin/routes/{name}`,
guard rollbacks, promotions); a change is written to the store first, then the route table is rebuilt
(`on_routes_changed`). Other replicas pick changes up when a shared store announces them (`watch`), and
at the latest within `sync_interval_s`.

Every route change is checked and written as one (`change_route`): its check reads the routes as the store
holds them, inside the store's exclusive transaction, so two changes (of this process, another worker's or
another replica's) can never both pass a check that only one of them may pass (an experiment taking a base
route as a variant while that route becomes an experiment itself). Adapters being added or removed are
`claiming`ed under the same lock: meanwhile no route change may name them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from pydantic import ValidationError

from gateway.config import GatewayConfig, RouteConfig
from gateway.errors import quoted
from gateway.experiments import guard as guard_rule
from gateway.experiments.allocation import thompson_weights
from gateway.experiments.facts import FactLog
from gateway.experiments.store import (
    ExperimentEvent,
    ExperimentStore,
    FactRow,
    RequestFact,
    RouteChange,
    RouteOverride,
)

log = logging.getLogger(__name__)
PURGE_INTERVAL_S = 3600.0
GUARD_WINDOW = 20_000     # per variant: the guard judges the latest this many requests since the route changed


class ExperimentError(Exception):
    """An experiment operation that cannot be done as asked (the message says why)."""


class UnknownExperimentError(ExperimentError):
    pass


DROP = object()   # what a `change_route` decision returns to drop the route's run-time version


@dataclass(frozen=True)
class RouteGraph:
    """What a route change is checked against, all read at one moment inside the change (`change_route`)."""
    routes: tuple[RouteConfig, ...]     # in force: the config's, with the stored run-time versions applied
    overridden: frozenset[str]          # routes that have a run-time version
    adapters: frozenset[str]            # registered adapters (their own routes)
    claimed: frozenset[str]             # adapters being added or removed: no route change may name them now

    def route(self, name: str) -> RouteConfig | None:
        return next((r for r in self.routes if r.name == name), None)


def usable_overrides(stored: Iterable[RouteOverride]) -> dict[str, RouteOverride]:
    """The stored run-time routes this config can use; one it cannot (a backend since removed) is skipped, logged."""
    usable = {}
    for override in stored:
        try:
            RouteConfig.model_validate(override.route)
        except ValidationError as exc:
            log.error("route %s set at run time is not valid any more and is not used: %s", override.name, exc)
            continue
        usable[override.name] = override
    return usable


def in_force(config_routes: Sequence[RouteConfig], overrides: Mapping[str, RouteOverride]) -> list[RouteConfig]:
    """The config's routes, each replaced by its run-time version; routes added at run time last."""
    base = [RouteConfig.model_validate(overrides[r.name].route) if r.name in overrides else r for r in config_routes]
    names = {r.name for r in config_routes}
    return base + [RouteConfig.model_validate(o.route) for n, o in overrides.items() if n not in names]


class Experiments:
    def __init__(self, config: GatewayConfig, store: ExperimentStore, events: ExperimentEvents) -> None:
        self.config = config
        self.settings = config.experiments
        self.store = store
        self.events = events
        self.facts = FactLog(store, self.settings, on_dropped=events.facts_dropped, on_batch=self._guard_soon)
        self.overrides: dict[str, RouteOverride] = {}
        self.weights: dict[str, dict[str, float]] = {}      # adaptive allocation's weights, per experiment
        self.on_routes_changed: Callable[[], None] = lambda: None
        self._guard_due: set[str] = set()
        self._windows: dict[str, dict[str, deque[FactRow]]] = {}   # the guard's view, per experiment and variant
        self._guard_task: asyncio.Task | None = None
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._change = asyncio.Lock()       # one route change at a time (PUT, rollback, promotion, reload)
        self._claims: Counter[str] = Counter()   # adapter names being added or removed (`claiming`)
        self.adapter_names: Callable[[], Iterable[str]] = lambda: ()   # the registered adapters (the lifecycle's)
        self._wake = asyncio.Event()        # the store announced a route change: reload now

    # --- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        await self._load_overrides()
        await self.store.watch(self._wake.set)
        self.facts.start()
        self._tasks = [asyncio.create_task(self._sync_loop(), name="experiments-sync"),
                       asyncio.create_task(self._allocation_loop(), name="experiments-allocation")]

    async def aclose(self) -> None:
        self._closing = True     # the last flush below must not start a guard pass on a closing store
        tasks = [*self._tasks, *([self._guard_task] if self._guard_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.facts.aclose()
        await self.store.close()

    async def _load_overrides(self) -> bool:
        """Read the run-time routes; True when they changed. One that this config cannot use is skipped, logged."""
        return self._adopt(usable_overrides(await self.store.route_overrides()))

    def _adopt(self, overrides: dict[str, RouteOverride]) -> bool:
        """The run-time routes as read from the store; True when they changed."""
        before = {(n, o.updated_at) for n, o in self.overrides.items()}
        changed = {name for name, _ in before ^ {(n, o.updated_at) for n, o in overrides.items()}}
        self.overrides = overrides
        for name in changed:    # changed elsewhere: as after a change here, weights and the guard start afresh
            self.weights.pop(name, None)
            self._windows.pop(name, None)
        return bool(changed)

    async def _sync_loop(self) -> None:
        last_purge = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.sync_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()     # before reading: an announcement during the read wakes us once more
            try:
                async with self._change:     # not between a change's write and its own bookkeeping
                    changed = await self._load_overrides()
                if changed:
                    self.on_routes_changed()
                if time.time() - last_purge > PURGE_INTERVAL_S:
                    last_purge = time.time()
                    await self.store.purge(time.time() - self.settings.retention_days * 86400)
            except Exception:
                log.exception("experiments sync failed")

    # --- routes in force ------------------------------------------------------------------------

    def routes(self) -> list[RouteConfig]:
        """The config's routes, each replaced by its run-time version; routes added at run time last."""
        return in_force(self.config.routes, self.overrides)

    def route(self, name: str) -> RouteConfig | None:
        return next((r for r in self.routes() if r.name == name), None)

    def experiment(self, name: str) -> RouteConfig:
        route = self.route(name)
        if route is None or route.experiment is None:
            raise UnknownExperimentError(f"No experiment named {quoted(name)}.")
        return route

    def weights_in_force(self, route: RouteConfig) -> dict[str, float]:
        return dict(self.weights.get(route.name) or route.experiment.variants)

    async def change_route(self, name: str, decide: Callable[[RouteGraph], RouteConfig | object | None],
                           kind: str = "route", detail: str | None = None, variant: str | None = None
                           ) -> RouteConfig | None:
        """Check and write route `name` as one (module doc): `decide(graph)` returns its new run-time version, DROP
        (back to the config file's) or None (no change), or raises (nothing written). It runs inside the store's
        transaction (on the SQLite store's thread: it must only read the graph and immutable things). Returns the
        route written."""
        async with self._change:
            adapters, claimed = frozenset(self.adapter_names()), frozenset(self._claims)

            def checked(stored: list[RouteOverride]) -> RouteChange | None:
                overrides = usable_overrides(stored)
                decided = decide(RouteGraph(tuple(in_force(self.config.routes, overrides)),
                                            frozenset(o.name for o in stored), adapters, claimed))
                if decided is None:
                    return None
                if decided is DROP:
                    return RouteChange(name, None)
                return RouteChange(name, RouteOverride(name, decided.model_dump(mode="json"), time.time()))

            stored, change = await self.store.change_route(checked)
            self._adopt(usable_overrides(stored))     # with what other replicas changed, read in the same transaction
            if change is None:
                return None
            self.weights.pop(name, None)
            self._windows.pop(name, None)     # the guard counts afresh from this change
            route = RouteConfig.model_validate(change.override.route) if change.override is not None else None
            if route is not None and route.experiment is not None:
                await self.store.add_event(ExperimentEvent(name, change.override.updated_at, kind, variant,
                                                           detail or f"weights {route.experiment.variants}"))
            self.on_routes_changed()
            return route

    async def put_route(self, route: RouteConfig, kind: str = "route", detail: str | None = None,
                        variant: str | None = None) -> None:
        """Write `route` as it is, unchecked."""
        await self.change_route(route.name, lambda graph: route, kind, detail, variant)

    async def delete_route(self, name: str) -> bool:
        """Drop the run-time version of `name`, unchecked; False when there was none."""
        dropped = []

        def decide(graph: RouteGraph) -> object | None:
            if name not in graph.overridden:
                return None
            dropped.append(name)
            return DROP
        await self.change_route(name, decide)
        return bool(dropped)

    @asynccontextmanager
    async def claiming(self, adapter: str, check: Callable[[list[RouteConfig]], None]):
        """An adapter being added or removed: `check(routes in force)` and the claim are made under the route
        lock, and while the claim lasts no route change may name the adapter (`RouteGraph.claimed`)."""
        async with self._change:
            check(self.routes())
            self._claims[adapter] += 1
        try:
            yield
        finally:
            self._claims[adapter] -= 1
            if not self._claims[adapter]:
                del self._claims[adapter]

    def since(self, name: str) -> float:
        """Where the guard starts counting: the route's last run-time change (else everything retained)."""
        override = self.overrides.get(name)
        return override.updated_at if override else 0.0

    # --- the canary guard -----------------------------------------------------------------------

    def _guard_soon(self, facts: Sequence[RequestFact]) -> None:
        """A batch of facts was written: add them to the guard's windows and look at their experiments soon (at
        most every guard_interval_s). Windows that were never filled are read from the store first."""
        for fact in facts:
            window = self._windows.get(fact.experiment)
            if window is not None and fact.at >= self.since(fact.experiment):
                window.setdefault(fact.variant, deque(maxlen=GUARD_WINDOW)).append(FactRow(
                    fact.at, fact.variant, fact.status, fact.latency_s, fact.ttft_s, None, None, None, None))
            self._guard_due.add(fact.experiment)
        if self._closing:
            return
        if self._guard_task is None or self._guard_task.done():
            self._guard_task = asyncio.create_task(self._guard_pass(), name="experiments-guard")

    async def _guard_pass(self) -> None:
        while self._guard_due:
            due, self._guard_due = self._guard_due, set()
            for name in due:
                try:
                    await self.guard(name)
                except Exception:
                    log.exception("canary guard of %s failed", name)
            await asyncio.sleep(self.settings.guard_interval_s)

    async def _window(self, name: str) -> dict[str, deque[FactRow]]:
        window = self._windows.get(name)
        if window is None:      # once per process and route change: what the store has since the change
            window = {}
            for row in await self.store.experiment_facts(name, self.since(name)):
                window.setdefault(row.variant, deque(maxlen=GUARD_WINDOW)).append(row)
            self._windows[name] = window
        return window

    async def guard(self, name: str) -> list[str]:
        """Roll back each candidate the guard's rule condemns; returns their names."""
        route = self.route(name)
        if route is None or route.experiment is None or not route.experiment.guard.enabled:
            return []
        experiment = route.experiment
        window = await self._window(name)
        control = guard_rule.Sample.of(window.get(experiment.control, ()))
        condemned = []
        for candidate, weight in experiment.variants.items():
            if candidate == experiment.control or weight <= 0:
                continue
            verdict = guard_rule.judge(experiment.guard, control, guard_rule.Sample.of(window.get(candidate, ())))
            if verdict is not None:
                await self.rollback(name, candidate, verdict)
                condemned.append(candidate)
        return condemned

    async def rollback(self, name: str, candidate: str, verdict: guard_rule.Verdict) -> None:
        def decide(graph: RouteGraph) -> RouteConfig | None:
            route = graph.route(name)
            if route is None or route.experiment is None or not route.experiment.variants.get(candidate):
                return None     # another pass (or replica, or an admin) got there first
            variants = dict(route.experiment.variants)
            control = route.experiment.control
            variants[control] += variants[candidate]     # its users go back to the control
            variants[candidate] = 0
            return route.model_copy(update={"experiment": route.experiment.model_copy(update={"variants": variants})})

        if await self.change_route(name, decide, "rollback", verdict.detail, candidate) is not None:
            log.warning("canary guard: %s of experiment %s rolled back to weight 0: %s", candidate, name, verdict.detail)
            self.events.guard_event(name, candidate, verdict.reason)

    # --- adaptive allocation --------------------------------------------------------------------

    async def _allocation_loop(self) -> None:
        while True:
            adaptive = [r for r in self.routes() if r.experiment and r.experiment.allocation.mode == "thompson"]
            interval = min((r.experiment.allocation.interval_s for r in adaptive), default=60.0)
            await asyncio.sleep(interval)
            try:
                changed = False
                for route in adaptive:
                    changed |= await self.reallocate(route.name)
                if changed:
                    self.on_routes_changed()
            except Exception:
                log.exception("adaptive allocation failed")

    async def reallocate(self, name: str) -> bool:
        route = self.experiment(name)
        live = [v for v, w in route.experiment.variants.items() if w > 0]   # a rolled-back variant stays out
        if len(live) < 2:
            return False
        outcomes = {v: (0.0, 0) for v in live}
        for row in await self.store.experiment_facts(name, self.since(name)):
            value = row.label if row.label is not None else row.score
            if value is not None and row.variant in outcomes:
                successes, trials = outcomes[row.variant]
                outcomes[row.variant] = (successes + value, trials + 1)
        self.weights[name] = thompson_weights(outcomes, route.experiment.allocation.floor)
        return True

    # --- report and promotion -------------------------------------------------------------------

    async def report(self, name: str) -> dict:
        route = self.experiment(name)
        rows = await self.store.experiment_facts(name)
        shadows = await self.store.shadow_calls(name)
        events = await self.store.events(name)
        # Imported here: the report needs scipy, which costs every gateway ~1.5 s of start and ~25 MB if imported
        # at start; only a report asks for it.
        from gateway.experiments.report import build_report
        return build_report(name, route.experiment, self.weights_in_force(route), rows, shadows, events)

    async def promote(self, name: str, variant: str | None, swap: Callable, files: Callable[[str], Mapping]) -> dict:
        """The winner becomes what the route serves: the control adapter takes the winner's files through the
        adapter lifecycle's swap (`swap(control, source, gguf)`), then the control gets all the weight."""
        await self.facts.flush()
        report = await self.report(name)
        route = self.experiment(name)
        control = route.experiment.control
        winner = variant or report["winner"]
        if winner is None:
            raise ExperimentError(f"Experiment '{name}' has no decision yet ({report['decision']}); name the "
                                  "variant to promote to promote one anyway.")
        if winner not in route.experiment.variants:
            raise ExperimentError(f"{quoted(winner)} is not a variant of experiment '{name}' "
                                  f"({list(route.experiment.variants)}).")
        if winner != control:
            source = files(winner)
            await swap(control, source.get("source"), source.get("gguf"))

        def decide(graph: RouteGraph) -> RouteConfig:
            """The weights of the route as it is now: a change made while the swap ran is kept, not overwritten."""
            now = graph.route(name)
            if now is None or now.experiment is None or now.experiment.control != control \
                    or winner not in now.experiment.variants:
                done = f"'{control}' serves {winner}'s files now, but " if winner != control else ""
                raise ExperimentError(f"Experiment '{name}' was changed while it was being promoted: {done}its "
                                      "weights were left as they are; look at it again.")
            variants = {v: (100 if v == control else 0) for v in now.experiment.variants}
            return now.model_copy(update={"experiment": now.experiment.model_copy(update={"variants": variants})})

        detail = (f"{winner} promoted: {control} now serves its files" if winner != control
                  else f"{control} kept: candidates set to weight 0")
        await self.change_route(name, decide, "promote", detail, winner)
        self.events.promoted(name, winner)
        return {"experiment": name, "promoted": winner, "control": control, "detail": detail}


class ExperimentEvents:
    """Where experiments report for metrics (the gateway's recorder implements it)."""

    def facts_dropped(self, count: int) -> None:
        pass

    def guard_event(self, experiment: str, variant: str, reason: str) -> None:
        pass

    def promoted(self, experiment: str, variant: str) -> None:
        pass

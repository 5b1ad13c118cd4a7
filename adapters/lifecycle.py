"""AdapterLifecycle: the one owner of every adapter state transition (register, validate, load, verify, flip,
drain, unload, reconcile). HTTP handlers and the CLI only call it; the data plane only reads `routes()`.

Truth lives in the store (adapters/store.py) and is mirrored here; each backend's replicas are handled by
a BackendPlacement. A swap brings the new version in under its own label, verifies it on every replica that
is up, flips the route in one store write, drains the old version's requests, then unloads it. Any failure
before the flip rolls back, and the old version keeps serving. A background loop reconciles what each
replica says it has with what it should have, after every health cycle and whenever a driver saw a replica
change (a restart).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from adapters.affinity import AffinityPlan
from adapters.errors import AdapterInUseError, AdapterPlacementError, RestartNeededError
from adapters.models import AdapterRecord, AdapterSpec, AdapterVersion, ReplicaPhase, ReplicaState, VersionStatus
from adapters.placement import BackendPlacement, Launcher, is_present
from adapters.store import AdapterExistsError, AdapterNotFoundError, AdapterStore
from adapters.validation import AdapterFacts, AdapterValidationError, BaseModelDims, validate_adapter
from backends.base import BackendDriver

log = logging.getLogger(__name__)
RECONCILE_INTERVAL_S = 5.0
INTERRUPTED = "interrupted by a gateway restart"


class LifecycleEvents(Protocol):
    """Where the lifecycle reports for metrics (the gateway's recorder implements it)."""
    def adapter_operation(self, op: str, result: str) -> None: ...
    def adapter_loaded(self, adapter: str, backend: str, loaded: bool) -> None: ...


class StepClock:
    """Where an operation's time went, for the log: `validate 0.004 s, load+verify 0.210 s, ...`."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.steps: list[tuple[str, float]] = []

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.steps.append((step, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {seconds:.3f} s" for step, seconds in self.steps)


class NoEvents:
    def adapter_operation(self, op: str, result: str) -> None:
        pass

    def adapter_loaded(self, adapter: str, backend: str, loaded: bool) -> None:
        pass


@dataclass(frozen=True)
class ActiveAdapter:
    """What routing needs of an adapter: its spec and the label of the version that takes traffic."""
    spec: AdapterSpec
    label: str


def check_config_adapters(specs: Sequence[AdapterSpec], roots: Sequence[str], base: BaseModelDims | None,
                          max_rank: Mapping[str, int | None]) -> None:
    """Validate every config adapter now (before a server starts): the first bad one raises, named."""
    for index, spec in enumerate(specs):
        ranks = [max_rank[b] for b in spec.backends if max_rank.get(b)]
        try:
            validate_adapter(spec.source, spec.gguf, roots, base, min(ranks) if ranks else None)
        except AdapterValidationError as exc:
            raise AdapterValidationError(f"adapters[{index}] ({spec.name}): {exc}") from exc


class AdapterLifecycle:
    def __init__(self, store: AdapterStore, drivers: Mapping[str, BackendDriver], *, roots: Sequence[str],
                 base: BaseModelDims | None = None, max_rank: Mapping[str, int | None] | None = None,
                 launchers: Mapping[str, Sequence[Launcher]] | None = None,
                 events: LifecycleEvents | None = None, drain_deadline_s: float = 600.0,
                 max_pinned: Mapping[str, int] | None = None, capacity: Mapping[str, int | None] | None = None) -> None:
        self.store = store
        self.drivers = drivers
        self.roots = tuple(roots)
        self.base = base
        self.max_rank = dict(max_rank or {})
        self.events = events or NoEvents()
        self.records: dict[str, AdapterRecord] = {}
        self.versions: dict[str, dict[str, AdapterVersion]] = {}
        self.states: dict[tuple[str, str, str, int], ReplicaState] = {}
        self.on_routes_changed: Callable[[], None] | None = None
        self.placements = {name: BackendPlacement(name, driver, self._set_state, drain_deadline_s=drain_deadline_s,
                                                  launchers=(launchers or {}).get(name),
                                                  max_pinned=(max_pinned or {}).get(name, 0))
                           for name, driver in drivers.items()}
        self._operation = asyncio.Lock()   # one register/swap/remove at a time
        self._dirty: set[tuple[str, int]] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        for name, driver in drivers.items():
            driver.on_replica_change = lambda replica, backend=name: self.mark_dirty(backend, replica)
        # Backends whose replicas hold only so many versions: where each version lives (adapters/affinity.py).
        self.plans = {name: AffinityPlan(len(driver.replicas), (capacity or {})[name])
                      for name, driver in drivers.items() if driver.dynamic_adapters and (capacity or {}).get(name)}

    # --- start and stop ---------------------------------------------------------------------------------

    async def start(self, config_specs: Iterable[AdapterSpec], usable: Callable[[AdapterSpec], bool]) -> None:
        """Load the registry, settle what a crash left in flight, seed and validate config adapters (a bad one
        raises AdapterValidationError: the gateway must not start on it), then reconcile in the background."""
        await self.store.open()
        config_specs = list(config_specs)
        await self.store.seed(config_specs)
        from_config = {spec.name for spec in config_specs}
        for record in await self.store.adapters():
            if usable(record.spec):
                self.records[record.spec.name] = record
        retiring = []
        for version in await self.store.versions():
            if version.status is VersionStatus.CANDIDATE:  # a swap or registration that a crash cut short
                version = version.with_status(VersionStatus.FAILED, INTERRUPTED)
                await self.store.put_version(version)
            if version.status is VersionStatus.RETIRING:   # flipped away from, not yet unloaded
                retiring.append(version)
            self.versions.setdefault(version.adapter, {})[version.version] = version
        await self._load_states()
        for record in list(self.records.values()):
            try:
                await self._ensure_active(record)
            except AdapterValidationError as exc:
                if record.spec.name in from_config and record.origin == "config":
                    raise AdapterValidationError(f"adapter {record.spec.name!r}: {exc}") from exc
                log.error("adapter %s is not served: %s", record.spec.name, exc)
                del self.records[record.spec.name]
        for label in self._active_labels():
            for placement in self.placements.values():
                placement.driver.expect(label)  # requests wait for the first load instead of failing
        for name, placement in self.placements.items():
            await placement.start_servers(self._wanted(name))
        self._changed()
        self.mark_all_dirty()
        self._task = asyncio.create_task(self._reconcile_loop(retiring), name="adapter-reconcile")

    async def _load_states(self) -> None:
        """What the last process saw, until this one looks again: what was in flight says so."""
        for state in await self.store.states():
            driver = self.drivers.get(state.backend)
            if driver is None or state.replica not in driver.replicas:
                continue
            if state.state in (ReplicaPhase.LOADING, ReplicaPhase.VERIFYING, ReplicaPhase.DRAINING,
                               ReplicaPhase.PENDING, ReplicaPhase.CONVERTING):
                state = ReplicaState(state.adapter, state.version, state.backend, state.replica, state.state,
                                     INTERRUPTED, state.updated_at)
            key = (state.adapter, state.version, state.backend, driver.replicas.index(state.replica))
            self.states[key] = state

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for placement in self.placements.values():
            await placement.stop_servers()
        await self.store.close()

    async def _ensure_active(self, record: AdapterRecord) -> None:
        """Every adapter serves one version: the active one, validated again now (its files may have
        changed or gone); a registry entry with none gets its first version activated."""
        facts = await self._validate(record.spec.source, record.spec.gguf, record.spec.backends)
        known = self.versions.get(record.spec.name, {})
        if record.active is not None and record.active == facts.content_hash:
            return
        if record.active is not None:
            log.warning("adapter %s: its files changed on disk since version %s; serving them as a new version",
                        record.spec.name, record.active[:8])
        version = known.get(facts.content_hash) or self._new_version(record.spec, facts)
        await self.store.put_version(version)
        self.records[record.spec.name] = await self.store.activate(version)
        self.versions.setdefault(record.spec.name, {})[version.version] = version.with_status(VersionStatus.ACTIVE)

    # --- operations -------------------------------------------------------------------------------------

    async def register(self, spec: AdapterSpec) -> None:
        """A new adapter: validated, loaded and verified everywhere it is planned, then routed. On failure
        nothing of it stays registered."""
        async with self._operation:
            facts = await self._validate(spec.source, spec.gguf, spec.backends)
            record = await self.store.add_adapter(spec, "admin")
            self.records[spec.name] = record
            version = self._new_version(spec, facts)
            try:
                await self._bring_in(version, spec.backends)
            except BaseException:
                await self.store.remove_adapter(spec.name)
                del self.records[spec.name]
                raise
            await self._flip(version)
        self.events.adapter_operation("add", "ok")

    async def swap(self, name: str, source: str | None, gguf: str | None) -> bool:
        """Bring in the new files as a new version; False when they are the active version already."""
        clock = StepClock()
        async with self._operation:
            record = self._record(name)
            spec = record.spec.model_copy(update={k: v for k, v in (("source", source), ("gguf", gguf)) if v})
            facts = await self._validate(spec.source, spec.gguf, spec.backends)
            clock.lap("validate")
            if facts.content_hash == record.active:
                return False
            version = self._new_version(spec, facts)
            old = self.versions[name].get(record.active) if record.active else None
            await self._bring_in(version, spec.backends, keep=old)
            clock.lap("load+verify")
            await self._flip(version)
            clock.lap("flip")
        if old is not None:
            await self._retire(old, spec.backends)
            clock.lap("drain+unload")
        log.info("swap %s -> %s: %s", name, version.label, clock)
        self.events.adapter_operation("swap", "ok")
        return True

    async def remove(self, name: str, referenced_by: Sequence[str] = ()) -> None:
        if referenced_by:
            raise AdapterInUseError(f"Adapter '{name}' is a variant of experiment(s) {list(referenced_by)}; "
                                    "change them first.")
        async with self._operation:
            record = self._record(name)
            await self.store.remove_adapter(name)
            del self.records[name]
            self._changed()
        if record.active is not None:
            await self._retire(self.versions[name][record.active], record.spec.backends)
        self.events.adapter_operation("remove", "ok")

    async def _bring_in(self, version: AdapterVersion, backends: Sequence[str], keep: AdapterVersion | None = None) -> None:
        """Load and verify on every replica that is up; any failure unloads it again and raises."""
        await self.store.put_version(version)
        self.versions.setdefault(version.adapter, {})[version.version] = version
        failures: list[str] = []
        restart_only = True
        for backend in backends:
            placement = self.placements[backend]
            async with placement.lock:
                keep_here = self._wanted(backend, exclude=version.adapter) + ([keep] if keep else [])
                up = placement.driver.replica_up()
                homes = self._homes_for(backend, version, keep, up)
                for replica in placement.replicas:
                    if homes is not None and replica not in homes:
                        continue
                    if not up[replica] and any(up):
                        await self._set_state(version, backend, replica, ReplicaPhase.PENDING, "replica down")
                        continue
                    failed = await placement.place(replica, [version], keep_here)
                    for reason in failed.values():
                        phase = self.states[(version.adapter, version.version, backend, replica)].state
                        restart_only &= phase is ReplicaPhase.RESTART_NEEDED
                        failures.append(f"{backend} {placement.driver.replicas[replica]}: {reason}")
        if failures:
            await self._retire(version, backends, status=VersionStatus.FAILED, reason="; ".join(failures))
            self.events.adapter_operation("load", "error")
            error = RestartNeededError if restart_only else AdapterPlacementError
            raise error(f"{version.label} was not brought in, and nothing changed: " + "; ".join(failures))

    async def _flip(self, version: AdapterVersion) -> None:
        """The route now points at `version`: one store write, then a new route table."""
        record = await self.store.activate(version)
        self.records[version.adapter] = record
        versions = self.versions[version.adapter]
        for known in list(versions.values()):
            if known.status is VersionStatus.ACTIVE and known.version != version.version:
                versions[known.version] = known.with_status(VersionStatus.RETIRING)
        versions[version.version] = version.with_status(VersionStatus.ACTIVE)
        self._changed()

    async def _retire(self, version: AdapterVersion, backends: Sequence[str], *,
                      status: VersionStatus = VersionStatus.RETIRED, reason: str | None = None) -> None:
        for backend in backends:
            placement = self.placements[backend]
            async with placement.lock:
                for replica in placement.replicas:
                    if (version.adapter, version.version, backend, replica) in self.states:
                        await placement.unload(replica, version)
                self._report_loaded(version.adapter, backend)
            placement.driver.forget(version.label)
        version = version.with_status(status, reason)
        self.versions.setdefault(version.adapter, {})[version.version] = version
        await self.store.put_version(version)

    # --- reconciliation ---------------------------------------------------------------------------------

    def mark_dirty(self, backend: str, replica: int) -> None:
        self._dirty.add((backend, replica))
        self._wakeup.set()

    def mark_all_dirty(self) -> None:
        for name, placement in self.placements.items():
            for replica in placement.replicas:
                self._dirty.add((name, replica))
        self._wakeup.set()

    async def _reconcile_loop(self, retiring: Sequence[AdapterVersion] = ()) -> None:
        for version in retiring:  # a swap that a crash cut short after its flip: finish it
            record = self.records.get(version.adapter)
            if record is not None:
                await self._retire(version, record.spec.backends)
        while True:
            try:
                async with asyncio.timeout(RECONCILE_INTERVAL_S):
                    await self._wakeup.wait()
            except TimeoutError:
                self.mark_all_dirty()
            self._wakeup.clear()
            self._update_plans()
            dirty, self._dirty = self._dirty, set()
            for backend, replica in sorted(dirty):
                try:
                    await self.reconcile(backend, replica)
                except Exception:  # one replica's trouble must not stop the loop
                    log.exception("reconciling %s replica %d failed", backend, replica)

    async def reconcile_all(self) -> None:
        """Every replica, now (tests, and `serve` before it reports ready)."""
        self._dirty.clear()
        self._update_plans()
        for name, placement in self.placements.items():
            for replica in placement.replicas:
                await self.reconcile(name, replica)

    async def reconcile(self, backend: str, replica: int) -> None:
        """Make one replica hold what it should: reload what it lost, verify what it has, unload what retired."""
        placement = self.placements[backend]
        if not placement.driver.replica_up()[replica]:
            return
        async with placement.lock:
            every = self._wanted(backend)
            wanted = self._wanted_on(backend, replica, every)
            try:
                loaded = await placement.driver.list_adapters(replica)
            except Exception:
                return
            for version in wanted:
                if version.label in placement.ready[replica] and not is_present(version, loaded, placement.fixed_name):
                    log.warning("%s replica %s lost %s (restarted?): reloading", backend,
                                placement.driver.replicas[replica], version.label)
                    placement.lose(replica, version)
            for version in [v for v in every if v not in wanted and v.label in placement.ready[replica]]:
                await placement.evict(replica, version)  # its slot here goes to a busier version
            todo = [v for v in wanted if v.label not in placement.ready[replica]]
            if todo:
                await placement.place(replica, todo, [v for v in wanted if v not in todo], pin=True)
            for version in every:
                self._report_loaded(version.adapter, backend)

    # --- views ------------------------------------------------------------------------------------------

    def active(self) -> list[ActiveAdapter]:
        return [ActiveAdapter(record.spec, self.versions[name][record.active].label)
                for name, record in self.records.items() if record.active is not None]

    def view(self, name: str) -> dict:
        record = self._record(name)
        versions = sorted(self.versions.get(name, {}).values(), key=lambda v: v.created_at)
        active = record.active[:8] if record.active else None
        return {
            "name": name, "class": self.versions[name][record.active].adapter_class if record.active else None,
            "profile": record.spec.profile, "backends": list(record.spec.backends), "origin": record.origin,
            "active": active, "source": record.spec.source, "gguf": record.spec.gguf,
            "versions": [{"version": v.version, "short": v.short, "status": v.status.value, "source": v.source,
                          "gguf": v.gguf, "rank": v.rank, "created_at": v.created_at, "reason": v.reason}
                         for v in versions],
            "replicas": [{"backend": s.backend, "replica": s.replica, "version": s.version[:8], "state": s.state.value,
                          "reason": s.reason, "updated_at": s.updated_at}
                         for key, s in sorted(self.states.items()) if key[0] == name],
        }

    def views(self) -> list[dict]:
        return [self.view(name) for name in self.records]

    def names(self) -> list[str]:
        return list(self.records)

    # --- helpers ----------------------------------------------------------------------------------------

    def _record(self, name: str) -> AdapterRecord:
        record = self.records.get(name)
        if record is None:
            raise AdapterNotFoundError(name)
        return record

    def _wanted(self, backend: str, exclude: str | None = None) -> list[AdapterVersion]:
        """The active version of every adapter planned on `backend`."""
        return [self.versions[name][record.active] for name, record in self.records.items()
                if record.active is not None and backend in record.spec.backends and name != exclude]

    def _wanted_on(self, backend: str, replica: int, wanted: list[AdapterVersion]) -> list[AdapterVersion]:
        """What one replica should hold: everything, unless the backend's replicas cannot hold it all."""
        plan = self.plans.get(backend)
        if plan is None or len(wanted) <= plan.capacity:
            return wanted
        here = plan.holds(replica)
        return [v for v in wanted if v.label in here]

    def _homes_for(self, backend: str, version: AdapterVersion, keep: AdapterVersion | None,
                   up: list[bool]) -> set[int] | None:
        """Where a version being brought in goes: everywhere (None), or where the plan makes room for it."""
        plan = self.plans.get(backend)
        if plan is None or len(self._wanted(backend, exclude=version.adapter)) + 1 <= plan.capacity:
            return None
        return plan.place_new(version.label, up, inherit=keep.label if keep is not None else None)

    def _update_plans(self) -> None:
        """Demand since the last update moves versions' homes; the replicas whose homes changed are reconciled."""
        for backend, plan in self.plans.items():
            driver = self.drivers[backend]
            labels = [v.label for v in self._wanted(backend)]
            if len(labels) <= plan.capacity:
                continue
            before = {label: set(homes) for label, homes in plan.homes.items()}
            plan.update(labels, {label: driver.adapter_requests(label) for label in labels}, driver.replica_up(),
                        time.monotonic())
            for label in labels:
                for replica in before.get(label, set()) ^ plan.homes.get(label, set()):
                    self._dirty.add((backend, replica))

    def _active_labels(self) -> list[str]:
        return [adapter.label for adapter in self.active()]

    async def _validate(self, source: str | None, gguf: str | None, backends: Sequence[str]) -> AdapterFacts:
        ranks = [self.max_rank[b] for b in backends if self.max_rank.get(b)]
        try:
            return await asyncio.to_thread(validate_adapter, source, gguf, self.roots, self.base,
                                           min(ranks) if ranks else None)
        except AdapterValidationError:
            self.events.adapter_operation("validate", "invalid")
            raise

    @staticmethod
    def _new_version(spec: AdapterSpec, facts: AdapterFacts) -> AdapterVersion:
        return AdapterVersion(spec.name, facts.content_hash, spec.source, spec.gguf, facts.adapter_class,
                              facts.rank, VersionStatus.CANDIDATE, time.time())

    async def _set_state(self, version: AdapterVersion, backend: str, replica: int, phase: ReplicaPhase,
                         reason: str | None) -> None:
        url = self.drivers[backend].replicas[replica]
        state = ReplicaState(version.adapter, version.version, backend, url, phase, reason, time.time())
        self.states[(version.adapter, version.version, backend, replica)] = state
        log.info("%s on %s %s: %s%s", version.label, backend, url, phase.value, f" ({reason})" if reason else "")
        await self.store.put_state(state)

    def _report_loaded(self, adapter: str, backend: str) -> None:
        record = self.records.get(adapter)
        label = self.versions[adapter][record.active].label if record and record.active else None
        loaded = label is not None and any(label in ready for ready in self.placements[backend].ready)
        self.events.adapter_loaded(adapter, backend, loaded)

    def _changed(self) -> None:
        if self.on_routes_changed is not None:
            self.on_routes_changed()


__all__ = ["ActiveAdapter", "AdapterExistsError", "AdapterLifecycle", "AdapterNotFoundError", "LifecycleEvents"]

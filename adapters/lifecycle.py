"""AdapterLifecycle: the one owner of every adapter state transition (register, validate, load, verify, flip,
drain, unload, reconcile). HTTP handlers and the CLI only call it; the data plane only reads `routes()`.

Truth lives in the store (adapters/store.py) and is mirrored here; each backend's replicas are handled by
a BackendPlacement. A swap brings the new version in under its own label, verifies it on every replica that
is up, flips the route in one store write, drains the old version's requests, then unloads it. Any failure
before the flip rolls back, and the old version keeps serving. A background loop reconciles what each
replica says it has with what it should have, after every health cycle and whenever a driver saw a replica
change (a restart).

A fleet (several gateway replicas on one PostgreSQL store) shares the store and the backends: each replica
mirrors the store (`refresh`, on every change notification and after a lost connection), trusts the `ready`
states other replicas wrote for a backend replica, and does backend work and admin operations under leases
(adapters/lease.py), so that no two replicas load, unload or restart the same thing at once. What a dead
replica left half done is settled by another once its lease runs out (`settle`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from adapters.affinity import AffinityPlan
from adapters.conversion import ConversionError, Converter, Step, Unconverted, needs_step, plan, with_artifacts
from adapters.errors import AdapterInUseError, AdapterPlacementError, RestartNeededError
from adapters.lease import Leases, LocalLeases, holding
from adapters.models import AdapterRecord, AdapterSpec, AdapterVersion, ReplicaPhase, ReplicaState, VersionStatus
from adapters.placement import BackendPlacement, Launcher, is_present
from adapters.store import AdapterExistsError, AdapterNotFoundError, AdapterStore, StoreUnavailableError
from adapters.validation import AdapterFacts, AdapterValidationError, BaseModelDims, validate_adapter
from backends.base import BackendDriver

log = logging.getLogger(__name__)
RECONCILE_INTERVAL_S = 5.0
INTERRUPTED = "interrupted by a gateway restart"
TAKEN_OVER = "interrupted: the gateway replica doing it stopped; rolled back by another"
MIRROR_INTERVAL_S = 10.0      # a fleet replica re-reads the store at least this often, notified or not
REREAD_S = 0.02              # a refresh that read while a write of ours was in flight reads again after this
PROPAGATION_S = 1.0           # every replica applies a committed change within this; a swap waits it out
OPERATION_WAIT_S = 60.0       # an admin operation waits this long for another replica's operation to end
BACKEND_WAIT_S = 120.0        # backend work waits this long for another replica's (a drained restart)
UNSETTLED = (VersionStatus.CANDIDATE, VersionStatus.RETIRING)
GONE = (VersionStatus.RETIRING, VersionStatus.RETIRED, VersionStatus.FAILED)


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
                          max_rank: Mapping[str, int | None], kinds: Mapping[str, str] | None = None) -> None:
    """Validate every config adapter now (before a server starts): the first bad one raises, named. Given the
    backends' kinds, an adapter that one of its backends cannot serve even converted is refused too."""
    for index, spec in enumerate(specs):
        ranks = [max_rank[b] for b in spec.backends if max_rank.get(b)]
        try:
            facts = validate_adapter(spec.source, spec.gguf, roots, base, min(ranks) if ranks else None)
            if kinds is not None:
                plan(facts, {b: kinds[b] for b in spec.backends if b in kinds})
        except AdapterValidationError as exc:
            raise AdapterValidationError(f"adapters[{index}] ({spec.name}): {exc}") from exc


class AdapterLifecycle:
    def __init__(self, store: AdapterStore, drivers: Mapping[str, BackendDriver], *, roots: Sequence[str],
                 base: BaseModelDims | None = None, max_rank: Mapping[str, int | None] | None = None,
                 launchers: Mapping[str, Sequence[Launcher]] | None = None,
                 events: LifecycleEvents | None = None, drain_deadline_s: float = 600.0,
                 max_pinned: Mapping[str, int] | None = None, leases: Leases | None = None,
                 converter: Converter | None = None, capacity: Mapping[str, int | None] | None = None) -> None:
        self.store = store
        self.converter = converter or Unconverted()
        self.made: dict[tuple[str, str], dict[str, str]] = {}   # (adapter, version) -> its converted artifacts
        self.leases = leases or LocalLeases()
        self.fleet = leases is not None and not isinstance(leases, LocalLeases)   # other replicas share the store
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
        self._heard = asyncio.Event()        # the store announced a change (or a reconnect)
        self._mirroring = asyncio.Lock()     # one refresh at a time: an older snapshot never lands on a newer one
        self._mirror_task: asyncio.Task | None = None
        self._usable: Callable[[AdapterSpec], bool] = lambda spec: True
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
        self._usable = usable
        config_specs = list(config_specs)
        await self.store.seed(config_specs)
        from_config = {spec.name for spec in config_specs}
        for record in await self.store.adapters():
            if usable(record.spec):
                self.records[record.spec.name] = record
        retiring = []
        for version in await self.store.versions():
            # What a crash cut short; in a fleet, only where no live replica's operation holds the adapter.
            if version.status in UNSETTLED and not await self._abandoned(version.adapter):
                self.versions.setdefault(version.adapter, {})[version.version] = version
                continue
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
        if self.fleet:
            await self.store.watch(self._heard.set)
            self._mirror_task = asyncio.create_task(self._mirror_loop(), name="adapter-mirror")

    async def _abandoned(self, adapter: str) -> bool:
        """No replica is operating on `adapter` (its lease is free or ran out); always so for one replica."""
        if not self.fleet:
            return True
        if not await self.leases.acquire(f"adapter:{adapter}", 0):
            return False
        await self.leases.release(f"adapter:{adapter}")
        return True

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
        for task in (self._task, self._mirror_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for placement in self.placements.values():
            await placement.stop_servers()
        await self.store.close()

    async def _ensure_active(self, record: AdapterRecord) -> None:
        """Every adapter serves one version: the active one, validated again now (its files may have
        changed or gone); a registry entry with none gets its first version activated."""
        facts = await self._validate(record.spec.source, record.spec.gguf, record.spec.backends)
        made = await self.converter.convert(facts, self._plan(facts, record.spec.backends))  # cached: no rerun
        self.made[(record.spec.name, facts.content_hash)] = made
        known = self.versions.get(record.spec.name, {})
        if record.active is not None and record.active == facts.content_hash:
            version = known.get(record.active)
            if version is not None:
                known[version.version] = with_artifacts(version, made)
            return
        if record.active is not None:
            log.warning("adapter %s: its files changed on disk since version %s; serving them as a new version",
                        record.spec.name, record.active[:8])
        version = known.get(facts.content_hash) or self._new_version(record.spec, facts)
        version = with_artifacts(version, made)
        await self.store.put_version(version)
        self.records[record.spec.name] = await self.store.activate(version)
        self.versions.setdefault(record.spec.name, {})[version.version] = version.with_status(VersionStatus.ACTIVE)

    # --- operations -------------------------------------------------------------------------------------

    async def register(self, spec: AdapterSpec) -> None:
        """A new adapter: validated, loaded and verified everywhere it is planned, then routed. On failure
        nothing of it stays registered."""
        async with self._leased(spec.name), self._operation:
            facts = await self._validate(spec.source, spec.gguf, spec.backends)
            steps = self._plan(facts, spec.backends)
            record = await self.store.add_adapter(spec, "admin")
            self.records[spec.name] = record
            version = self._new_version(spec, facts)
            try:
                version = await self._convert(version, facts, steps, spec.backends)
                await self._bring_in(version, spec.backends)
            except BaseException:
                await self.store.remove_adapter(spec.name)
                self.records.pop(spec.name, None)   # a refresh may have mirrored the removal already
                raise
            await self._flip(version)
        self.events.adapter_operation("add", "ok")

    async def swap(self, name: str, source: str | None, gguf: str | None) -> bool:
        """Bring in the new files as a new version; False when they are the active version already."""
        clock = StepClock()
        async with self._leased(name):   # held through the drain: a dead replica's retirement is taken over
            async with self._operation:
                record = self._record(name)
                spec = record.spec.model_copy(update={k: v for k, v in (("source", source), ("gguf", gguf)) if v})
                facts = await self._validate(spec.source, spec.gguf, spec.backends)
                clock.lap("validate")
                if facts.content_hash == record.active:
                    return False
                steps = self._plan(facts, spec.backends)
                version = await self._convert(self._new_version(spec, facts), facts, steps, spec.backends)
                clock.lap("convert")
                old = self.versions[name].get(record.active) if record.active else None
                await self._bring_in(version, spec.backends, keep=old)
                clock.lap("load+verify")
                await self._flip(version)
                clock.lap("flip")
            if old is not None:
                await self._propagated()
                await self._retire(old, spec.backends)
                clock.lap("drain+unload")
        log.info("swap %s -> %s: %s", name, version.label, clock)
        self.events.adapter_operation("swap", "ok")
        return True

    async def remove(self, name: str, referenced_by: Sequence[str] = ()) -> None:
        if referenced_by:
            raise AdapterInUseError(f"Adapter '{name}' is a variant of experiment(s) {list(referenced_by)}; "
                                    "change them first.")
        async with self._leased(name):
            async with self._operation:
                record = self._record(name)
                await self.store.remove_adapter(name)
                self.records.pop(name, None)   # the mirror loop may have applied the removal already (a fleet)
                self._changed()
            if record.active is not None:
                await self._propagated()
                await self._retire(self.versions[name][record.active], record.spec.backends)
        self.events.adapter_operation("remove", "ok")

    async def _propagated(self) -> None:
        """After a flip: in a fleet, every replica stops routing to the old version before it is drained."""
        if self.fleet:
            await asyncio.sleep(PROPAGATION_S)

    async def _bring_in(self, version: AdapterVersion, backends: Sequence[str], keep: AdapterVersion | None = None) -> None:
        """Load and verify on every replica that is up; any failure unloads it again and raises."""
        await self.store.put_version(version)
        self.versions.setdefault(version.adapter, {})[version.version] = version
        failures: list[str] = []
        restart_only = True
        for backend in backends:
            placement = self.placements[backend]
            async with self._backend(placement, BACKEND_WAIT_S):
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
            async with self._backend(placement, BACKEND_WAIT_S):
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
                except StoreUnavailableError as exc:
                    log.warning("reconciling %s replica %d waits for the adapter store: %s", backend, replica, exc)
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
        async with placement.lock:   # the lock first, then the lease: the order `_backend` takes them in
            if not await self.leases.acquire(f"backend:{backend}", 0):
                return   # another replica is working there; the next round looks again
            try:
                await self._reconcile_locked(placement, backend, replica)
            finally:
                await self.leases.release(f"backend:{backend}")

    async def _reconcile_locked(self, placement: BackendPlacement, backend: str, replica: int) -> None:
        """Reload what it lost, verify what it has (`reconcile`, holding the backend)."""
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

    # --- a fleet: the store as every replica's truth --------------------------------------------------------

    @asynccontextmanager
    async def _leased(self, adapter: str):
        """An admin operation on `adapter`: one replica at a time; it starts from the store's latest word."""
        async with holding(self.leases, f"adapter:{adapter}", OPERATION_WAIT_S):
            if self.fleet:
                await self.refresh()
            yield

    @asynccontextmanager
    async def _backend(self, placement: BackendPlacement, wait_s: float):
        """Work on a backend: this replica's lock, then the fleet's lease for it."""
        async with placement.lock, holding(self.leases, f"backend:{placement.name}", wait_s):
            yield

    async def _mirror_loop(self) -> None:
        """Apply every change the store announces (and re-read at least every MIRROR_INTERVAL_S); then finish
        what a dead replica left half done."""
        interval = MIRROR_INTERVAL_S
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._heard.wait()
            except TimeoutError:
                pass
            self._heard.clear()
            try:
                await self.refresh()
                await self.settle()
                interval = MIRROR_INTERVAL_S
            except StoreUnavailableError as exc:
                log.warning("the adapter store is unreachable (%s); serving what this replica knows", exc)
                interval = 1.0   # look again soon: convergence right after the store is back
            except Exception:
                log.exception("applying the adapter store's changes failed")

    async def refresh(self) -> None:
        """Mirror the store: records, versions, states; routes and what each backend replica may serve. Refreshes
        run one at a time (the mirror loop's and an operation's may overlap): one that read the store earlier
        would otherwise apply its older snapshot last, and the replica would serve a past state until the next
        notification (a version already retired elsewhere, reloaded by the reconcile loop)."""
        async with self._mirroring:
            while True:
                writes = self.store.writes
                adapters, versions, states = await self.store.snapshot()
                if await self._convert_mirrored(adapters):
                    continue   # that took a while: read again
                # No write of ours began or ended during the read, and none was in flight (begun before the read,
                # committed during or after it): then the snapshot holds every write of ours we have applied.
                if self.store.writes == writes and not self.store.writing:
                    break
                if self.store.writing:
                    await asyncio.sleep(REREAD_S)   # a write of ours is in flight: read again once it is through
            self._apply(adapters, versions, states)

    async def _convert_mirrored(self, adapters: Sequence[AdapterRecord]) -> bool:
        """Active versions another replica registered: converted here too before they are mirrored (a shared
        conversion.cache_dir makes that a cache hit), so they are never forwarded with unconverted files. True
        when it converted something."""
        worked = False
        for record in adapters:
            name = record.spec.name
            if record.active is None or (name, record.active) in self.made or not self._usable(record.spec):
                continue
            try:
                facts = await self._validate(record.spec.source, record.spec.gguf, record.spec.backends)
                made = await self.converter.convert(facts, self._plan(facts, record.spec.backends))
            except AdapterValidationError as exc:
                log.error("adapter %s: cannot make its artifacts on this replica: %s", name, exc)
                continue
            self.made[(name, facts.content_hash)] = made
            worked = True
        return worked

    def _apply(self, adapters: Sequence[AdapterRecord], versions: Sequence[AdapterVersion],
               states: Sequence[ReplicaState]) -> None:
        known: dict[str, dict[str, AdapterVersion]] = {}
        for version in versions:   # the store keeps what was registered; what this replica converted stays
            made = self.made.get((version.adapter, version.version), {})
            known.setdefault(version.adapter, {})[version.version] = with_artifacts(version, made)
        records = {}
        for record in adapters:
            name = record.spec.name
            if record.active is not None and record.active not in known.get(name, {}):
                continue  # written between our reads; the next notification brings both
            if name in self.records or self._usable(record.spec):
                records[name] = record
        before = set(self._active_labels())
        self.records, self.versions = records, known
        self.states = {}
        for state in states:
            driver = self.drivers.get(state.backend)
            if driver is not None and state.replica in driver.replicas:
                self.states[(state.adapter, state.version, state.backend, driver.replicas.index(state.replica))] = state
        after = set(self._active_labels())
        for name, placement in self.placements.items():
            self._mirror_placement(name, placement)
            for label in after - before:
                placement.driver.expect(label)   # its requests wait for it to be ready here
            for label in before - after:
                placement.driver.forget(label)
        self._changed()   # a route's spec may have changed too (a swap keeps the label's adapter name)
        self.mark_all_dirty()

    def _mirror_placement(self, backend: str, placement: BackendPlacement) -> None:
        """Forward to what another replica verified on a shared backend replica; stop forwarding what retired."""
        wanted = {version.label: version for version in self._wanted(backend)}
        for replica in placement.replicas:
            ready, changed = placement.ready[replica], False
            for label, version in list(ready.items()):
                current = self.versions.get(version.adapter, {}).get(version.version)
                if version.adapter not in self.records or current is None or current.status in GONE:
                    del ready[label]
                    changed = True
            for label, version in wanted.items():
                state = self.states.get((version.adapter, version.version, backend, replica))
                if label not in ready and state is not None and state.state is ReplicaPhase.READY:
                    ready[label] = version
                    changed = True
            if changed:
                placement.publish(replica)

    async def settle(self) -> None:
        """Versions a dead replica left as candidates are rolled back, retiring ones retired, once no live
        replica holds their adapter (its lease ran out)."""
        for name, versions in list(self.versions.items()):
            unsettled = [v for v in versions.values() if v.status in UNSETTLED]
            unsettled = [v for v in unsettled if v.status is VersionStatus.CANDIDATE
                         or (name in self.records and self.records[name].active != v.version)]
            if not unsettled or not await self.leases.acquire(f"adapter:{name}", 0):
                continue
            try:
                await self.refresh()
                record = self.records.get(name)
                backends = record.spec.backends if record is not None else ()
                for version in self.versions.get(name, {}).values():
                    if version.status is VersionStatus.CANDIDATE:
                        log.warning("%s: taking over a registration or swap that another replica left; rolling back",
                                    version.label)
                        await self._retire(version, backends, status=VersionStatus.FAILED, reason=TAKEN_OVER)
                    elif version.status is VersionStatus.RETIRING and record is not None:
                        log.warning("%s: finishing the retirement another replica left", version.label)
                        await self._retire(version, backends)
                if record is not None and record.active is None:   # registered, never flipped: not registered
                    await self.store.remove_adapter(name)
                    self.records.pop(name, None)
                    self._changed()
            finally:
                await self.leases.release(f"adapter:{name}")

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
                          "gguf": v.gguf, "rank": v.rank, "created_at": v.created_at, "reason": v.reason,
                          "converted": {k: p for k, p in (("source", v.converted_source), ("gguf", v.converted_gguf))
                                        if p}}
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
        homes = self.plans.get(backend)
        if homes is None or len(self._wanted(backend, exclude=version.adapter)) + 1 <= homes.capacity:
            return None
        return homes.place_new(version.label, up, inherit=keep.label if keep is not None else None)

    def _update_plans(self) -> None:
        """Demand since the last update moves versions' homes; the replicas whose homes changed are reconciled."""
        for backend, homes in self.plans.items():
            driver = self.drivers[backend]
            labels = [v.label for v in self._wanted(backend)]
            if len(labels) <= homes.capacity:
                continue
            before = {label: set(where) for label, where in homes.homes.items()}
            homes.update(labels, {label: driver.adapter_requests(label) for label in labels}, driver.replica_up(),
                         time.monotonic())
            for label in labels:
                for replica in before.get(label, set()) ^ homes.homes.get(label, set()):
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

    def _plan(self, facts: AdapterFacts, backends: Sequence[str]) -> list[Step]:
        try:
            return plan(facts, {b: self.drivers[b].kind for b in backends if b in self.drivers})
        except ConversionError:
            self.events.adapter_operation("validate", "invalid")
            raise

    async def _convert(self, version: AdapterVersion, facts: AdapterFacts, steps: list[Step],
                       backends: Sequence[str]) -> AdapterVersion:
        """Make the artifacts the backends need (`converting` on their replicas meanwhile); the version then
        points at them. A failure leaves the version `failed` with the tool's last lines, and raises."""
        if not steps:
            return version
        await self.store.put_version(version)
        self.versions.setdefault(version.adapter, {})[version.version] = version
        affected = [b for b in backends if needs_step(self.drivers[b].kind, steps)]
        for backend in affected:
            for replica in self.placements[backend].replicas:
                await self._set_state(version, backend, replica, ReplicaPhase.CONVERTING, ", ".join(map(str, steps)))

        shown = [0.0]

        def progress(step: Step, line: str) -> None:
            """Each tool line goes to the log; the latest, once a second, to the replicas' `converting` reason
            (what `adapters show` displays while it runs; not stored: it changes too often)."""
            log.info("%s %s: %s", version.label, step.tool, line)
            if time.monotonic() - shown[0] >= 1.0 and line.strip():
                shown[0] = time.monotonic()
                for key, state in list(self.states.items()):
                    if key[:2] == (version.adapter, version.version) and state.state is ReplicaPhase.CONVERTING:
                        self.states[key] = replace(state, reason=f"{step.tool}: {line.strip()[:200]}")

        try:
            made = await self.converter.convert(facts, steps, progress)
        except ConversionError as exc:
            for backend in affected:
                for replica in self.placements[backend].replicas:
                    await self._set_state(version, backend, replica, ReplicaPhase.FAILED, "conversion failed")
            failed = version.with_status(VersionStatus.FAILED, str(exc))
            self.versions[version.adapter][version.version] = failed
            await self.store.put_version(failed)
            self.events.adapter_operation("convert", "error")
            raise ConversionError(f"{version.label}: {exc}") from exc
        self.events.adapter_operation("convert", "ok")
        self.made[(version.adapter, version.version)] = made
        return with_artifacts(version, made)

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
        try:
            await self.store.put_state(state)
        except StoreUnavailableError as exc:
            if not self.fleet:
                raise
            # A backend that restarted while the database is away still gets its adapters back: the state is
            # what others would trust, and without it they verify for themselves.
            log.warning("%s on %s %s: %s not recorded (%s)", version.label, backend, url, phase.value, exc)

    def _report_loaded(self, adapter: str, backend: str) -> None:
        record = self.records.get(adapter)
        label = self.versions[adapter][record.active].label if record and record.active else None
        loaded = label is not None and any(label in ready for ready in self.placements[backend].ready)
        self.events.adapter_loaded(adapter, backend, loaded)

    def _changed(self) -> None:
        if self.on_routes_changed is not None:
            self.on_routes_changed()


__all__ = ["ActiveAdapter", "AdapterExistsError", "AdapterLifecycle", "AdapterNotFoundError", "LifecycleEvents"]

"""GatewayState: everything a request needs, built once from the config and handed to both planes; the
lifespan starts and stops what it owns (drivers, the adapter lifecycle and its store, the health loop)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters.lease import StoreLeases
from adapters.lifecycle import AdapterLifecycle
from adapters.models import AdapterSpec
from adapters.store import AdapterStore, open_store
from adapters.validation import BaseModelDims, dims_from_gguf, dims_from_hf_config
from backends.base import BackendDriver
from backends.factory import build_drivers, build_launchers
from backends.launchers.supervisor import LaunchError
from gateway.auth import ClientKey, load_admin_digests, load_client_keys
from gateway.config import ConfigError, GatewayConfig, check_adapter_references, resolve_secret
from gateway.conversion import converter_of
from gateway.experiments.service import Experiments
from gateway.experiments.shadow import ShadowMirror
from gateway.experiments.postgres_store import PostgresExperimentStore
from gateway.experiments.sqlite_store import SqliteExperimentStore
from gateway.experiments.store import ExperimentStore
from gateway.metrics import ExperimentRecorder, FleetRecorder, LifecycleRecorder, Metrics
from gateway.routing import RouteTable
from gateway.shared import Shared, build_shared
from gateway.tracing import build_tracer

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 5.0


@dataclass
class GatewayState:
    config: GatewayConfig
    routes: RouteTable
    drivers: dict[str, BackendDriver]
    metrics: Metrics
    client_keys: tuple[ClientKey, ...] | None
    lifecycle: AdapterLifecycle
    shared: Shared
    experiments: Experiments
    shadows: ShadowMirror
    admin_digests: list[bytes] = field(default_factory=list)
    healthy: dict[str, bool] = field(default_factory=dict)
    draining: bool = False          # SIGTERM: /readyz answers 503 (gateway/shutdown.py)
    refusing: bool = False          # ... and, after shutdown.grace_s, new data-plane requests get 503
    _health_task: asyncio.Task | None = None
    fleet: FleetRecorder | None = None
    tracer: object | None = None     # gateway/tracing.py RequestTracer when `tracing:` is configured
    startup_error: str | None = None  # why `start` failed, on one line (a known cause; a bug keeps its traceback)

    def __post_init__(self) -> None:
        if self.fleet is None:
            self.fleet = FleetRecorder(self.metrics)

    async def start(self) -> None:
        self.lifecycle.on_routes_changed = self.rebuild_routes
        await self.shared.start()
        self.experiments.on_routes_changed = self.rebuild_routes
        self.experiments.adapter_names = self.lifecycle.names   # what route changes are checked against
        await self.experiments.start()   # run-time routes first: the lifecycle's first rebuild uses them
        await self.lifecycle.start(self.config.adapters, lambda spec: usable(self.config, spec))
        self.fleet.routes_changed(self.config, self.lifecycle.active())
        for driver in self.drivers.values():
            await driver.start()
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.shadows.aclose()
        await self.lifecycle.aclose()
        await self.shared.aclose()
        for driver in self.drivers.values():
            await driver.aclose()
        await self.experiments.aclose()   # after the drivers: the last requests' facts are written too
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flushes the last spans (blocking I/O)

    async def check_health(self) -> None:
        results = await asyncio.gather(*(d.health() for d in self.drivers.values()), return_exceptions=True)
        for name, up in zip(self.drivers, results):
            self.healthy[name] = up is True
            self.fleet.backend_up(name, up is True)
            for model, days in self.drivers[name].retirements():   # hosted sunset dates ahead (or passed)
                self.fleet.hosted_model_retirement(name, model, days)
        self.lifecycle.mark_all_dirty()  # every health cycle: each replica compared with the registry

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self.check_health()
            except Exception:  # a failing probe must never stop the loop
                log.exception("health check failed")

    def rebuild_routes(self) -> None:
        """A registry change: a new route table, swapped in whole (never mutated under a request)."""
        active = self.lifecycle.active()
        self.routes = RouteTable(self.config, active, self.experiments.routes(), self.experiments.weights)
        self.fleet.routes_changed(self.config, active)
        recorder = ExperimentRecorder(self.metrics)
        for route in self.routes.routes():
            if route.experiment is not None:
                recorder.weights(route.name, self.experiments.weights_in_force(route))

    def ready(self) -> bool:
        """Every route has at least one healthy target."""
        return not self.draining and all(
            any(self.healthy.get(t.backend) for t in route.targets)
            for route in self.routes.routes() if route.experiment is None)


def usable(config: GatewayConfig, spec: AdapterSpec) -> bool:
    """A registered adapter whose backends and profile still exist in this config; else logged, not served."""
    try:
        check_adapter_references(spec, config, f"registry adapter {spec.name!r}")
    except ValueError as exc:
        log.error("not serving %s", exc)
        return False
    return True


def base_model_dims(config: GatewayConfig) -> BaseModelDims | None:
    base = config.base_model
    try:
        if base.gguf:
            return dims_from_gguf(base.gguf)
        if base.hf_config:
            return dims_from_hf_config(base.hf_config)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base_model: {exc}") from exc
    return None


def launchers_of(config: GatewayConfig) -> dict:
    try:
        return build_launchers(config, Path(config.state_dir).expanduser() / "logs")
    except LaunchError as exc:  # a config that cannot run: named like any other config error
        raise ConfigError(str(exc)) from exc


def store_dsn(config: GatewayConfig) -> str:
    dsn = resolve_secret(config.store.dsn_env)
    if dsn is None:
        raise ConfigError(f"store.dsn_env: the environment variable {config.store.dsn_env} (the PostgreSQL DSN) "
                          "is not set")
    return dsn


def store_of(config: GatewayConfig) -> AdapterStore:
    """config `store`: SQLite in state_dir, or the PostgreSQL whose DSN the named env var holds."""
    if config.store.kind == "sqlite":
        return open_store(config.state_dir)
    return open_store(config.state_dir, store_dsn(config), config.store.pool_size)


def experiment_store_of(config: GatewayConfig) -> ExperimentStore:
    """Experiments live beside the adapter registry: the same PostgreSQL, or their own SQLite file."""
    if config.store.kind == "postgres":
        return PostgresExperimentStore(store_dsn(config), pool_size=config.store.pool_size)
    return SqliteExperimentStore(Path(config.state_dir).expanduser())


def check_state_dir(config: GatewayConfig) -> None:
    path = Path(config.state_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"state_dir: {config.state_dir} is not a directory")


def warn_unset_backend_keys(config: GatewayConfig) -> None:
    """A backend's `api_key_env` that is not set is not fatal (deploy/docker-compose.yml leaves the hosted key
    optional): that backend refuses the gateway, a 503 or the route's next target. Said once, at start."""
    for i, backend in enumerate(config.backends):
        if backend.api_key_env and resolve_secret(backend.api_key_env) is None:
            log.warning("backends[%d].api_key_env: the environment variable %s is not set; backend '%s' will be "
                        "called without a key", i, backend.api_key_env, backend.name)


def build_state(config: GatewayConfig, drivers: dict[str, BackendDriver] | None = None) -> GatewayState:
    check_state_dir(config)
    if drivers is None:
        warn_unset_backend_keys(config)
    drivers = drivers if drivers is not None else build_drivers(config, resolve_secret)
    metrics = Metrics()
    fleet = FleetRecorder(metrics)
    store = store_of(config)
    base = base_model_dims(config)
    lifecycle = AdapterLifecycle(
        store, drivers, roots=config.adapter_roots, base=base,
        max_rank={b.name: getattr(b, "max_lora_rank", None) for b in config.backends},
        max_pinned={b.name: max(0, (getattr(b, "max_loaded_adapters", None) or 8) - 1) for b in config.backends},
        capacity={b.name: getattr(b, "max_loaded_adapters", None) for b in config.backends},
        launchers=launchers_of(config),
        events=LifecycleRecorder(metrics),
        drain_deadline_s=config.adapter_drain_deadline_s,
        leases=StoreLeases(store) if config.store.kind == "postgres" else None,
        converter=converter_of(config, base))
    experiments = Experiments(config, experiment_store_of(config), ExperimentRecorder(metrics))
    state = GatewayState(
        config=config,
        routes=RouteTable(config, []),
        drivers=drivers,
        lifecycle=lifecycle,
        shared=build_shared(config, fleet),
        metrics=metrics,
        fleet=fleet,
        client_keys=load_client_keys(config),
        admin_digests=load_admin_digests(config),
        tracer=build_tracer(config),
        experiments=experiments,
        shadows=ShadowMirror(drivers, lambda: state.routes, experiments.facts,
                             {b.name: b.max_connections for b in config.backends},
                             ExperimentRecorder(metrics).shadow_call),
    )
    return state

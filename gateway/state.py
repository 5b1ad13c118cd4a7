"""GatewayState: everything a request needs, built once from the config and handed to both planes; the
lifespan starts and stops what it owns (drivers, the adapter lifecycle and its store, the health loop)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters.lifecycle import AdapterLifecycle
from adapters.models import AdapterSpec
from adapters.store import open_store
from adapters.validation import BaseModelDims, dims_from_gguf, dims_from_hf_config
from backends.base import BackendDriver
from backends.factory import build_drivers, build_launchers
from backends.launchers.supervisor import LaunchError
from gateway.auth import ClientKey, load_admin_digests, load_client_keys
from gateway.config import ConfigError, GatewayConfig, check_adapter_references, resolve_secret
from gateway.metrics import LifecycleRecorder, Metrics
from gateway.routing import RouteTable

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
    admin_digests: list[bytes] = field(default_factory=list)
    healthy: dict[str, bool] = field(default_factory=dict)
    draining: bool = False          # SIGTERM: /readyz answers 503 (gateway/shutdown.py)
    refusing: bool = False          # ... and, after shutdown.grace_s, new data-plane requests get 503
    _health_task: asyncio.Task | None = None

    async def start(self) -> None:
        self.lifecycle.on_routes_changed = self.rebuild_routes
        await self.lifecycle.start(self.config.adapters, lambda spec: usable(self.config, spec))
        for driver in self.drivers.values():
            await driver.start()
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.lifecycle.aclose()
        for driver in self.drivers.values():
            await driver.aclose()

    async def check_health(self) -> None:
        results = await asyncio.gather(*(d.health() for d in self.drivers.values()), return_exceptions=True)
        for name, up in zip(self.drivers, results):
            self.healthy[name] = up is True
            self.metrics.backend_up.labels(name).set(1 if up is True else 0)
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
        self.routes = RouteTable(self.config, self.lifecycle.active())

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


def build_state(config: GatewayConfig, drivers: dict[str, BackendDriver] | None = None) -> GatewayState:
    drivers = drivers if drivers is not None else build_drivers(config, resolve_secret)
    metrics = Metrics()
    lifecycle = AdapterLifecycle(
        open_store(config.state_dir), drivers, roots=config.adapter_roots, base=base_model_dims(config),
        max_rank={b.name: getattr(b, "max_lora_rank", None) for b in config.backends},
        max_pinned={b.name: max(0, (getattr(b, "max_loaded_adapters", None) or 8) - 1) for b in config.backends},
        capacity={b.name: getattr(b, "max_loaded_adapters", None) for b in config.backends},
        launchers=launchers_of(config),
        events=LifecycleRecorder(metrics),
        drain_deadline_s=config.adapter_drain_deadline_s)
    return GatewayState(
        config=config,
        routes=RouteTable(config, []),
        drivers=drivers,
        lifecycle=lifecycle,
        metrics=metrics,
        client_keys=load_client_keys(config),
        admin_digests=load_admin_digests(config),
    )

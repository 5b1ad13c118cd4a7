"""GatewayState: everything a request needs, built once from the config and handed to both planes."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from adapters.models import AdapterSpec
from adapters.registry import AdapterRegistry
from backends.base import BackendDriver
from backends.factory import adapter_plan, build_drivers
from gateway.auth import ClientKey, load_admin_digests, load_client_keys
from gateway.config import GatewayConfig, check_adapter_references, resolve_secret
from gateway.metrics import Metrics
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
    registry: AdapterRegistry
    adapters: list[AdapterSpec]
    admin_digests: list[bytes] = field(default_factory=list)
    healthy: dict[str, bool] = field(default_factory=dict)
    draining: bool = False
    _health_task: asyncio.Task | None = None

    async def start(self) -> None:
        for driver in self.drivers.values():
            await driver.start()
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for driver in self.drivers.values():
            await driver.aclose()

    async def check_health(self) -> None:
        results = await asyncio.gather(*(d.health() for d in self.drivers.values()), return_exceptions=True)
        for (name, driver), up in zip(self.drivers.items(), results):
            self.healthy[name] = up is True
            self.metrics.backend_up.labels(name).set(1 if up is True else 0)
            for adapter, loaded in driver.adapters().items():
                self.metrics.adapter_loaded.labels(adapter, name).set(1 if loaded else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self.check_health()
            except Exception:  # a failing probe must never stop the loop
                log.exception("health check failed")

    def replan(self, adapters: list[AdapterSpec]) -> None:
        """A registry change: a new route table (swapped, never mutated) and each driver's adapter plan."""
        self.adapters = adapters
        self.routes = RouteTable(self.config, adapters)
        for name, driver in self.drivers.items():
            driver.plan(adapter_plan(name, adapters))

    def ready(self) -> bool:
        """Every route has at least one healthy target."""
        return not self.draining and all(
            any(self.healthy.get(t.backend) for t in route.targets)
            for route in self.routes.routes() if route.experiment is None)


def usable_adapters(config: GatewayConfig, specs: list[AdapterSpec]) -> list[AdapterSpec]:
    """Registered adapters whose backends and profile still exist in this config; the rest are logged."""
    usable = []
    for spec in specs:
        try:
            check_adapter_references(spec, config, f"registry adapter {spec.name!r}")
        except ValueError as exc:
            log.error("not serving %s", exc)
            continue
        usable.append(spec)
    return usable


def build_state(config: GatewayConfig, drivers: dict[str, BackendDriver] | None = None) -> GatewayState:
    registry = AdapterRegistry(Path(config.state_dir).expanduser())
    registry.seed(config.adapters)
    adapters = usable_adapters(config, registry.specs())
    return GatewayState(
        config=config,
        routes=RouteTable(config, adapters),
        drivers=drivers if drivers is not None else build_drivers(config, resolve_secret, adapters),
        registry=registry,
        adapters=adapters,
        metrics=Metrics(),
        client_keys=load_client_keys(config),
        admin_digests=load_admin_digests(config),
    )

"""GatewayState: everything a request needs, built once from the config and handed to both planes."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from backends.base import BackendDriver
from backends.factory import build_drivers
from gateway.auth import ClientKey
from gateway.config import ConfigError, GatewayConfig, resolve_secret
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

    def ready(self) -> bool:
        """Every route has at least one healthy target."""
        return not self.draining and all(
            any(self.healthy.get(t.backend) for t in route.targets)
            for route in self.routes.routes() if route.experiment is None)


def client_keys(config: GatewayConfig) -> tuple[ClientKey, ...] | None:
    if config.auth.client_keys is None:
        return None
    keys = []
    for key in config.auth.client_keys:
        secret = resolve_secret(key.key_env)
        if secret is None:
            raise ConfigError(f"auth.client_keys[{key.name}]: the env var {key.key_env} is not set")
        keys.append(ClientKey(key.name, secret.encode(), key.models))
    return tuple(keys)


def build_state(config: GatewayConfig, drivers: dict[str, BackendDriver] | None = None) -> GatewayState:
    return GatewayState(
        config=config,
        routes=RouteTable(config),
        drivers=drivers if drivers is not None else build_drivers(config, resolve_secret),
        metrics=Metrics(),
        client_keys=client_keys(config),
    )

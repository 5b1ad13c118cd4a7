"""Drain: what SIGTERM does to a gateway behind a load balancer (DESIGN.md `shutdown`).

1. At once: /readyz answers 503 (the listener stays open, so the load balancer can see it) and requests
   are still served, because the load balancer has not noticed yet.
2. After `grace_s`: new data-plane requests get 503 with `retry-after` (the load balancer had time to stop
   sending; a client that still comes retries elsewhere).
3. Requests in flight, streams included, run to their end, up to `drain_deadline_s` after the signal;
   then the servers stop (whatever still runs is cut, and the log says how many).
Each step is logged and shown as `kimi_gateway_draining` (0 serving, 1 draining, 2 refusing).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from gateway.config import ShutdownConfig

log = logging.getLogger(__name__)
POLL_S = 0.05


class Drain:
    def __init__(self, state, data_plane, config: ShutdownConfig) -> None:
        self.state = state
        self.data_plane = data_plane   # its `active` count: data-plane requests in flight
        self.config = config
        self.task: asyncio.Task | None = None

    def begin(self, stop: Callable[[], None]) -> None:
        """The first SIGTERM starts the drain; another one stops at once."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run(stop), name="sigterm-drain")
        else:
            log.warning("second SIGTERM: stopping now, %d request(s) in flight are cut", self.data_plane.active)
            stop()

    async def run(self, stop: Callable[[], None]) -> None:
        loop, config, state = asyncio.get_running_loop(), self.config, self.state
        started = loop.time()
        state.draining = True
        state.fleet.draining(1)
        log.warning("SIGTERM: draining; /readyz answers 503 now, new requests are refused in %.1f s; %d in flight",
                    config.grace_s, self.data_plane.active)
        await asyncio.sleep(config.grace_s)
        state.refusing = True
        state.fleet.draining(2)
        log.warning("drain: refusing new requests (503); waiting for %d in flight, at most %.0f s more",
                    self.data_plane.active, max(0.0, started + config.drain_deadline_s - loop.time()))
        while self.data_plane.active and loop.time() < started + config.drain_deadline_s:
            await asyncio.sleep(POLL_S)
        left = self.data_plane.active
        if left:
            log.warning("drain deadline (%.0f s) reached: %d request(s) still in flight are cut", config.drain_deadline_s, left)
        else:
            log.warning("drained in %.1f s: every request finished; stopping", loop.time() - started)
        stop()

"""ReplicaTraffic: how a driver spreads requests over its replicas (the driver classes inherit it).

Which replica takes a request (backends/balancer.py: eligible replicas, the less loaded of two), the lease
that counts it there until its reply is closed, the slots per replica (`max_concurrency`, or read from the
servers) that the gateway's admission queue waits on through reserve() and on_capacity, the failures that
eject a replica and the half-open probes that readmit it (backends/outliers.py), and the retry budget
(backends/retry_budget.py). The send path itself stays in backends/openai_compat.py.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Sequence

from backends.balancer import ANY_REPLICA, NO_LIMIT, Balancer, Lease
from backends.base import BackendRequest
from backends.config import OutlierConfig, RetryBudgetConfig
from backends.errors import (
    AdapterNotReadyError,
    BackendAccountError,
    BackendError,
    BackendProtocolError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendTimeoutError,
    BackendUnavailableError,
)
from backends.outliers import OutlierDetector
from backends.retry_budget import RetryBudget

log = logging.getLogger(__name__)


class ReplicaTraffic:
    """Needs from the driver: name, replicas, _transports, _busy, _up, _held, _serving, _adapter_busy,
    _adapter_requests, _wait_for_replica(), _probe(); sets up the rest in configure_traffic()."""

    def configure_traffic(self, max_concurrency: int | None, outliers: OutlierConfig,
                          budget: RetryBudgetConfig) -> None:
        """Slots per replica (None: read from the servers at start, else unbounded), ejection, retry budget."""
        count = len(self._transports)
        self.outliers = OutlierDetector(self.replicas, outliers, backend=self.name)
        self.outliers.on_change = self._ejection_changed
        self.retry_budget = RetryBudget(budget.ratio, budget.min_per_s, budget.window_s)
        self._limits = [max_concurrency or NO_LIMIT] * count
        self._discover_limits = max_concurrency is None
        self._bounded = max_concurrency is not None     # some replica's slots are known: reserve() counts them
        self.balancer = Balancer(self._busy, self._up, self._held, self.outliers.ejected, self._serving, self._limits)
        self.on_capacity: Callable[[], None] | None = None     # a slot or a replica came free: the queue dispatches
        self.on_ejection: Callable[[int, bool], None] | None = None   # metrics and logs
        self._readmit_task: asyncio.Task | None = None

    async def _lease_any(self, request: BackendRequest) -> Lease:
        """Any replica that may take the request; one that failed it only when no other can (a retry on the
        same server, as with one replica)."""
        try:
            replica = self._pick(request.adapter, request.avoid)
        except AdapterNotReadyError:
            try:
                replica = self._pick(request.adapter) if request.avoid else None
            except AdapterNotReadyError:
                replica = None
            if replica is None:
                replica = await self._wait_for_replica(request.adapter)
        return self._lease(replica, request.adapter)

    def _replica_failed(self, replica: int, request: BackendRequest, exc: BaseException | None) -> bool:
        """A failure that is the replica's (connect, reset, 5xx, timeout): counted for ejection, and the
        request avoids that replica from now on. False for anything else (a 4xx, a cancelled request)."""
        if exc is not None and not is_replica_fault(exc):
            return False
        request.avoid.append(replica)
        if self.outliers.failure(replica) and self._readmit_task is None:
            self._readmit_task = asyncio.get_running_loop().create_task(self._readmit_loop(),
                                                                       name=f"{self.name}-readmit")
        return True

    def _may_retry_elsewhere(self, request: BackendRequest) -> bool:
        return self.balancer.pick(self._serving_key(request.adapter), request.avoid) is not None \
            and self.retry_budget.try_retry()

    def reserve(self, adapter: str | None) -> Lease | None:
        """A free slot, leased; None when every replica that could take it is full (queue it); ANY_REPLICA
        when slots are not counted here, or no replica can take it now (send() picks, or waits, as ever)."""
        if not self._bounded:
            return ANY_REPLICA
        key = self._serving_key(adapter)
        replica = self.balancer.pick(key, free_only=True)
        if replica is not None:
            return self._lease(replica, adapter)
        return None if self.balancer.pick(key) is not None else ANY_REPLICA

    def has_room(self) -> bool:
        return self.balancer.has_room()

    def _ejection_changed(self, replica: int, ejected: bool) -> None:
        if self.on_ejection is not None:
            self.on_ejection(replica, ejected)
        if not ejected:
            self._capacity()

    async def _readmit_loop(self) -> None:
        """Half-open probes of ejected replicas, until none is ejected (backends/outliers.py)."""
        try:
            while (wait := self.outliers.next_probe_in()) is not None:
                await asyncio.sleep(wait)
                for replica in self.outliers.due():
                    healthy = await self._probe(self._transports[replica])
                    if healthy:
                        self._up[replica] = True  # the same check the health loop makes: up from now on
                    self.outliers.probed(replica, healthy)
        finally:
            self._readmit_task = None

    def _capacity(self) -> None:
        if self.on_capacity is not None:
            self.on_capacity()

    def _lease(self, replica: int, adapter: str | None) -> Lease:
        """Count a reply in flight until it is closed: drains, the queue and /admin/backends read these counts."""
        self._busy[replica] += 1
        if adapter is not None:
            self._adapter_busy[adapter] = self._adapter_busy.get(adapter, 0) + 1
            self._adapter_requests[adapter] = self._adapter_requests.get(adapter, 0) + 1
        return Lease(replica, adapter, self._free)

    def _free(self, replica: int, adapter: str | None) -> None:
        self._busy[replica] -= 1
        if adapter is not None:
            self._adapter_busy[adapter] -= 1
        if self._bounded and self.on_capacity is not None:  # unbounded: nobody ever waits for a slot
            self.on_capacity()

    def _serving_key(self, adapter: str | None) -> str | None:
        """The name serve() lists for `adapter` (a server fixed to one adapter lists none)."""
        return None if self._any_adapter else adapter

    def _pick(self, adapter: str | None, avoid: Sequence[int] = ()) -> int:
        """The balancer's choice among replicas that serve `adapter`; with none up, one that serves it and is
        not held or ejected (the health check may lag), then one that is ejected, before giving up."""
        key = self._serving_key(adapter)
        replica = self.balancer.pick(key, avoid)
        if replica is not None:
            return replica
        ejected = self.outliers.ejected
        fallbacks = [r for r in range(len(self._transports)) if not self._held[r] and r not in avoid
                     and (key is None or key in self._serving[r])]
        fallbacks.sort(key=lambda r: (ejected[r], not self._up[r]))
        if fallbacks:
            return fallbacks[0]
        raise AdapterNotReadyError(f"Adapter version '{adapter}' is not ready on backend '{self.name}' yet.",
                                   backend=self.name)

    def replica_traffic(self) -> list[dict]:
        """Per replica, for /admin/backends: its slots (None: unbounded) and whether it is ejected."""
        return [{"slots": None if limit == NO_LIMIT else limit, "ejected": ejected}
                for limit, ejected in zip(self._limits, self.outliers.ejected)]

    async def discover_limits(self) -> None:
        """Each replica's slots from the server itself (max_concurrency unset): see read_concurrency()."""
        if self._discover_limits:
            for replica in range(len(self._transports)):
                await self._discover_limit(replica)

    async def _discover_limit(self, replica: int) -> None:
        try:
            slots = await self.read_concurrency(replica)
        except (BackendError, ValueError, KeyError, TypeError, AttributeError):
            return  # down or unreadable now: asked again when its health check passes
        if slots:
            self._limits[replica] = slots
            self._bounded = True
            log.info("%s replica %s: %d slots (max_concurrency)", self.name, self.replicas[replica], slots)
            self._capacity()

    async def read_concurrency(self, replica: int) -> int | None:
        """How many requests the server runs at once, where it says so (llama.cpp /props, SGLang /server_info)."""
        return None


def is_replica_fault(exc: BaseException) -> bool:
    """What says a replica is unwell (outlier detection counts it): it could not be reached, it broke the
    connection, it timed out, or it answered 5xx. Not: a 4xx, a rate limit, a refused account, an adapter it
    does not have yet, a request cancelled by its client."""
    if isinstance(exc, (AdapterNotReadyError, BackendAccountError, BackendRateLimitedError)):
        return False
    if isinstance(exc, BackendRejectedError):
        return exc.status >= 500
    return isinstance(exc, (BackendUnavailableError, BackendProtocolError, BackendTimeoutError))

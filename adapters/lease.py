"""Leases: who may do lifecycle work on a backend, or an operation on an adapter, right now.

Replicas of one fleet share backends, so loading, verifying, unloading and restarting there is done by one
replica at a time: each such step holds the lease `backend:<name>`, and each admin operation the lease
`adapter:<name>`. `LocalLeases` (one replica, SQLite) are in-process locks. `StoreLeases` are rows in the
PostgreSQL store with an expiry that the holder renews while it works: a replica that dies leaves a lease
that runs out after `ttl_s`, and then another takes over what it left (adapters/lifecycle.py `settle`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Protocol

log = logging.getLogger(__name__)
LEASE_TTL_S = 10.0
POLL_S = 0.1


class LeaseBusyError(Exception):
    """Another replica holds the lease and did not give it up in time (503: retry the admin call)."""


class Leases(Protocol):
    async def acquire(self, name: str, wait_s: float) -> bool: ...   # False: busy for all of wait_s
    async def release(self, name: str) -> None: ...


@asynccontextmanager
async def holding(leases: Leases, name: str, wait_s: float) -> AsyncIterator[None]:
    if not await leases.acquire(name, wait_s):
        raise LeaseBusyError(f"another gateway replica is working on {name.replace(':', ' ')}; retry shortly")
    try:
        yield
    finally:
        await leases.release(name)


class LocalLeases:
    """One process owns everything: a lock per name."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, name: str, wait_s: float) -> bool:
        lock = self._locks.setdefault(name, asyncio.Lock())
        if wait_s <= 0:
            if lock.locked():
                return False
            await lock.acquire()
            return True
        try:
            await asyncio.wait_for(lock.acquire(), wait_s)
        except TimeoutError:
            return False
        return True

    async def release(self, name: str) -> None:
        self._locks[name].release()


class LeaseRows(Protocol):
    """The store's half (adapters/store_postgres.py)."""
    async def take_lease(self, name: str, holder: str, ttl_s: float) -> bool: ...
    async def drop_lease(self, name: str, holder: str) -> None: ...


class StoreLeases:
    """Row leases with expiry, renewed every ttl/3 while held. Within this process a lock per name comes
    first, so that two tasks of one replica never share a lease."""

    def __init__(self, rows: LeaseRows, ttl_s: float = LEASE_TTL_S) -> None:
        self.rows = rows
        self.ttl_s = ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._local = LocalLeases()
        self._renewals: dict[str, asyncio.Task] = {}

    async def acquire(self, name: str, wait_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        if not await self._local.acquire(name, wait_s):
            return False
        try:
            while not await self.rows.take_lease(name, self.holder, self.ttl_s):
                if loop.time() >= deadline:
                    await self._local.release(name)
                    return False
                await asyncio.sleep(POLL_S)
        except BaseException:
            await self._local.release(name)
            raise
        self._renewals[name] = asyncio.create_task(self._renew(name), name=f"lease-{name}")
        return True

    async def release(self, name: str) -> None:
        renewal = self._renewals.pop(name, None)
        if renewal is not None:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
        try:
            await self.rows.drop_lease(name, self.holder)
        except Exception as exc:   # the store is down: the lease runs out on its own
            log.warning("lease %s not released (%s); it expires in %.0f s", name, exc, self.ttl_s)
        finally:
            await self._local.release(name)

    async def _renew(self, name: str) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.rows.take_lease(name, self.holder, self.ttl_s):
                    log.error("lease %s was taken over by another replica while this one held it", name)
            except Exception as exc:
                log.warning("lease %s not renewed (%s)", name, exc)

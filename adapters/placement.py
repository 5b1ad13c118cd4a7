"""BackendPlacement: how one backend's replicas hold adapter versions, and the only code that loads, verifies,
restarts (drained), unloads and publishes there. The lifecycle decides *what* goes where; this does it.

- A backend that loads at run time (SGLang) loads each version on every replica under its label `name@hash8`.
- One that loads only at start (llama.cpp) gets a drained restart with the new `--lora` list when the gateway
  manages its processes; otherwise the version is `restart_needed` there.
- Every version is verified on every replica before the driver may forward it there: a short greedy probe
  must repeat exactly and differ from the base model's answer.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from functools import partial
from typing import Awaitable, Callable, Protocol, Sequence

from adapters.models import AdapterVersion, ReplicaPhase
from backends.base import BackendDriver, LoadedAdapter
from backends.errors import BackendError

log = logging.getLogger(__name__)
SetState = Callable[[AdapterVersion, str, int, ReplicaPhase, "str | None"], Awaitable[None]]
DRAIN_POLL_S = 0.02


class Launcher(Protocol):
    """A process the gateway runs for one replica (backends/launchers)."""
    async def start(self, loras: Sequence[str]) -> None: ...
    async def restart(self, loras: Sequence[str]) -> None: ...
    async def stop(self) -> None: ...


class VerificationError(Exception):
    pass


def is_present(version: AdapterVersion, loaded: Sequence[LoadedAdapter], fixed_name: str | None) -> bool:
    """Named listings (SGLang) match the label, or the adapter name a server was launched with; unnamed ones
    (llama.cpp) match the GGUF file by real path."""
    for entry in loaded:
        if entry.name is not None:
            if entry.name == version.label or (fixed_name is not None and entry.name == fixed_name == version.adapter):
                return True
        elif version.files.gguf and os.path.realpath(entry.path) == os.path.realpath(version.files.gguf):
            return True
    return False


class BackendPlacement:
    def __init__(self, name: str, driver: BackendDriver, set_state: SetState, *,
                 launchers: Sequence[Launcher] | None = None, drain_deadline_s: float = 600.0,
                 max_pinned: int = 0) -> None:
        self.name = name
        self.driver = driver
        self.launchers = list(launchers) if launchers else None
        self.lock = asyncio.Lock()       # one placement at a time per backend: operations and reconciliation
        self.ready: list[dict[str, AdapterVersion]] = [{} for _ in driver.replicas]
        self._set_state = set_state
        self._drain_deadline_s = drain_deadline_s
        self._max_pinned = max_pinned
        self._pinned: set[str] = set()
        self.fixed_name = getattr(driver, "expert_adapter", None)
        for replica, launcher in enumerate(self.launchers or ()):
            if hasattr(launcher, "on_state"):   # a Supervisor: its crashes and restarts reach the driver at once
                launcher.on_state = partial(self._server_state, replica)

    @property
    def replicas(self) -> range:
        return range(len(self.driver.replicas))

    # --- the steps --------------------------------------------------------------------------------------

    async def place(self, replica: int, versions: Sequence[AdapterVersion], keep: Sequence[AdapterVersion],
                    *, pin: bool = False) -> dict[str, str]:
        """Bring `versions` to ready on one replica; `keep` is everything else that must stay loaded there
        (for a restart's `--lora` list). Returns label -> reason for those that failed."""
        failures: dict[str, str] = {}
        try:
            loaded = await self.driver.list_adapters(replica)
        except BackendError as exc:
            for version in versions:
                await self._set_state(version, self.name, replica, ReplicaPhase.PENDING, f"replica unreachable: {exc}")
                failures[version.label] = f"replica {self.driver.replicas[replica]} is unreachable"
            return failures
        missing = [v for v in versions if not is_present(v, loaded, self.fixed_name)]
        if missing and not self.driver.dynamic_adapters:
            if self.launchers is None:
                for version in missing:
                    reason = self._restart_hint(version)
                    await self._set_state(version, self.name, replica, ReplicaPhase.RESTART_NEEDED, reason)
                    failures[version.label] = reason
                versions = [v for v in versions if v not in missing]
            else:
                for version in missing:
                    await self._set_state(version, self.name, replica, ReplicaPhase.LOADING, "drained restart")
                await self.restart_drained(replica, [*keep, *versions])
        for version in versions:
            try:
                if self.driver.dynamic_adapters and version in missing:
                    await self._set_state(version, self.name, replica, ReplicaPhase.LOADING, None)
                    await self._load(replica, version, pin)
                await self._set_state(version, self.name, replica, ReplicaPhase.VERIFYING, None)
                await self.verify(replica, version)
            except (BackendError, VerificationError) as exc:
                reason = str(exc) or type(exc).__name__
                await self._set_state(version, self.name, replica, ReplicaPhase.FAILED, reason)
                failures[version.label] = reason
                self.driver.forget(version.label)  # waiting requests get a 503 now, not after the hold timeout
                continue
            self.ready[replica][version.label] = version
            await self._set_state(version, self.name, replica, ReplicaPhase.READY, None)
        self.publish(replica)
        return failures

    async def _load(self, replica: int, version: AdapterVersion, pin: bool) -> None:
        pinned = pin and len(self._pinned) < self._max_pinned
        try:
            await self.driver.load_adapter(replica, version.label, version.files, pinned=pinned)
        except BackendError:
            if not pinned:
                raise
            await self.driver.load_adapter(replica, version.label, version.files, pinned=False)  # pin limit
            pinned = False
        if pinned:
            self._pinned.add(version.label)

    async def verify(self, replica: int, version: AdapterVersion) -> None:
        first = await self.driver.probe(replica, version.label, version.files)
        again = await self.driver.probe(replica, version.label, version.files)
        if first != again:
            raise VerificationError(f"the probe did not repeat on {self.driver.replicas[replica]}")
        if self.fixed_name is None:  # a server with a fixed expert adapter refuses base requests
            base = await self.driver.probe(replica, None, None)
            if base == first:
                raise VerificationError(f"{version.label} answers exactly like the base model on "
                                        f"{self.driver.replicas[replica]}: the adapter is not applied")

    async def unload(self, replica: int, version: AdapterVersion) -> None:
        """Stop forwarding it there, wait for its requests, then unload (run-time backends) or leave the file
        to the next restart (llama.cpp, whose list only changes at a restart)."""
        if self.ready[replica].pop(version.label, None) is not None:
            self.publish(replica)
        await self._set_state(version, self.name, replica, ReplicaPhase.DRAINING, None)
        await self._wait(lambda: self.driver.adapter_in_flight(version.label) == 0)
        reason = None
        if self.driver.dynamic_adapters:
            try:
                await self.driver.unload_adapter(replica, version.label)
            except BackendError as exc:
                reason = f"unload failed ({exc}); SGLang evicts it as least recently used"
            self._pinned.discard(version.label)
        elif self.launchers is None or self.fixed_name is not None:
            reason = "not served; the file stays loaded until the server's next restart"
        else:
            reason = "not served; dropped from --lora at the next restart"
        await self._set_state(version, self.name, replica, ReplicaPhase.UNLOADED, reason)

    async def evict(self, replica: int, version: AdapterVersion) -> None:
        """Another version needs this replica's slot (adapters/affinity.py): stop forwarding it here, then
        unload it (SGLang unregisters it at once and lets the requests it runs finish first)."""
        if self.ready[replica].pop(version.label, None) is None:
            return
        self.publish(replica)
        reason = "moved: this replica's slots went to busier adapters"
        try:
            await self.driver.unload_adapter(replica, version.label)
        except BackendError as exc:
            reason += f" (unload failed: {exc}; SGLang evicts it as least recently used)"
        await self._set_state(version, self.name, replica, ReplicaPhase.UNLOADED, reason)

    async def restart_drained(self, replica: int, loras: Sequence[AdapterVersion]) -> None:
        """Hold new requests for the replica (they wait, or go to another replica), let the running ones
        finish, restart it with `loras`, read its new adapter ids, then let requests in again."""
        assert self.launchers is not None
        files = list(dict.fromkeys(v.files.gguf for v in loras if v.files.gguf))
        started = time.monotonic()
        self.driver.hold(replica)
        try:
            await self._wait(lambda: self.driver.in_flight()[replica] == 0)
            drained = time.monotonic()
            self.driver.disconnect(replica)
            await self.launchers[replica].restart(files)
            restarted = time.monotonic()
            await self.driver.list_adapters(replica)
        finally:
            self.driver.release(replica)
        log.info("%s replica %s: drained in %.3f s, restarted in %.3f s, held %.3f s", self.name,
                 self.driver.replicas[replica], drained - started, restarted - drained, time.monotonic() - started)

    async def start_servers(self, wanted: Sequence[AdapterVersion]) -> None:
        """Managed servers start with every wanted version's file already in their list."""
        files = list(dict.fromkeys(v.files.gguf for v in wanted if v.files.gguf))
        await asyncio.gather(*(launcher.start(files) for launcher in self.launchers or ()))

    async def stop_servers(self) -> None:
        await asyncio.gather(*(launcher.stop() for launcher in self.launchers or ()))

    def _server_state(self, replica: int, state: str) -> None:
        self.driver.set_replica_up(replica, state == "ready")

    def publish(self, replica: int) -> None:
        """The versions the driver may forward to this replica: verified ones only."""
        self.driver.serve(replica, {label: v.files for label, v in self.ready[replica].items()})

    def lose(self, replica: int, version: AdapterVersion) -> None:
        """The replica no longer has it: not forwarded there until it is loaded and verified again."""
        if self.ready[replica].pop(version.label, None) is not None:
            self.driver.lost(replica, version.label)
            self.publish(replica)

    async def _wait(self, done: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_deadline_s
        while not done() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    def _restart_hint(self, version: AdapterVersion) -> str:
        return (f"llama-server must be restarted with {os.path.basename(version.files.gguf or '')} in its --lora list "
                "(or give the backend a `launch` block so that the gateway restarts it, drained)")

"""ShadowMirror: a fraction of an experiment's requests sent again to a shadow candidate, for comparison only.

A shadow call starts once the client's answer is complete, runs as its own task and never waits for room:
past the experiment's `max_concurrency`, or past its `backend_share` of the shadow backend's connections, the
mirror is dropped (and counted). Its result (status, latency, tokens, the output's sha256 and length) goes to
the FactLog; nothing of it reaches the client. Shadow calls are never streamed and never retried.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import replace
from typing import Callable, Mapping

import orjson

from backends.base import BackendDriver, BackendRequest
from backends.errors import BackendError, BackendRejectedError
from gateway.experiments.facts import FactLog
from gateway.experiments.store import ShadowCall

log = logging.getLogger(__name__)


class PendingShadows:
    """The mirrors picked for one request, started by `start()` when its answer is done."""

    __slots__ = ("mirror", "experiment", "request", "names")

    def __init__(self, mirror: ShadowMirror, experiment: str, request: BackendRequest, names: list[str]) -> None:
        self.mirror, self.experiment, self.request, self.names = mirror, experiment, request, names

    def start(self) -> None:
        for name in self.names:
            self.mirror.launch(self.experiment, name, self.request)


class ShadowMirror:
    def __init__(self, drivers: Mapping[str, BackendDriver], routes: Callable[[], object], facts: FactLog,
                 max_connections: Mapping[str, int], count: Callable[[str, str, str], None]) -> None:
        self.drivers = drivers
        self.routes = routes              # the route table in force (it is swapped whole on changes)
        self.facts = facts
        self.max_connections = dict(max_connections)
        self.count = count                # (experiment, variant, result)
        self.in_flight: dict[str, int] = {}           # per experiment
        self.backend_in_flight: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()

    def pick(self, experiment_route, request: BackendRequest) -> PendingShadows | None:
        """Roll the dice for each shadow candidate of the experiment; None (the common case) when none won."""
        shadow = experiment_route.experiment.shadow if experiment_route is not None else None
        if not shadow:
            return None
        names = [name for name, fraction in shadow.items() if random.random() < fraction]
        if not names:
            return None
        body = {k: v for k, v in request.body.items() if k != "stream_options"}
        body["stream"] = False
        copy = replace(request, body=body, stream=False, hide_usage_chunk=False, observer=None, adjustments=[])
        return PendingShadows(self, experiment_route.name, copy, names)

    def launch(self, experiment: str, name: str, request: BackendRequest) -> None:
        route = self.routes().get(name)
        config = self.routes().get(experiment)
        if route is None or config is None or not route.targets:
            self.count(experiment, name, "error")
            return
        target = route.targets[0]
        limits = config.experiment.shadow_limits
        backend_limit = max(1, int(limits.backend_share * self.max_connections.get(target.backend, 1)))
        if (self.in_flight.get(experiment, 0) >= limits.max_concurrency
                or self.backend_in_flight.get(target.backend, 0) >= backend_limit):
            self.count(experiment, name, "dropped")
            return
        self.in_flight[experiment] = self.in_flight.get(experiment, 0) + 1
        self.backend_in_flight[target.backend] = self.backend_in_flight.get(target.backend, 0) + 1
        request = replace(request, route=route.name, adapter=target.adapter, request_id=request.request_id + ":shadow",
                          adjustments=[])
        task = asyncio.create_task(self._call(experiment, name, target, request, limits.timeout_s))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, experiment, target.backend))

    def _done(self, task: asyncio.Task, experiment: str, backend: str) -> None:
        self.tasks.discard(task)
        self.in_flight[experiment] -= 1
        self.backend_in_flight[backend] -= 1

    async def _call(self, experiment: str, name: str, target, request: BackendRequest, timeout_s: float) -> None:
        started, status, body, error, result = time.perf_counter(), 0, None, None, "error"
        usage = None
        try:
            driver = self.drivers[target.backend]
            async with asyncio.timeout(timeout_s):
                driver.check(request)
                reply = await driver.send(request)
                try:
                    body = await reply.read()
                    status, usage = reply.status, reply.usage
                finally:
                    await reply.aclose()
        except TimeoutError:
            error, result = f"no answer within {timeout_s:g} s", "timeout"
        except BackendRejectedError as exc:
            status, error = exc.status, f"{type(exc).__name__}: {exc.message}"[:300]
        except BackendError as exc:
            error = f"{type(exc).__name__}: {exc.message}"[:300]
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a shadow must never take anything else down
            log.exception("shadow call to %s failed", name)
            error = type(exc).__name__
        latency = time.perf_counter() - started
        output = output_text(body) if body is not None else None
        self.count(experiment, name, "ok" if error is None else result)
        completion = (usage or {}).get("completion_tokens")
        self.facts.shadow(ShadowCall(
            request.request_id.removesuffix(":shadow"), time.time(), experiment, name, target.adapter, target.backend,
            status, latency, completion if isinstance(completion, int) else None,
            hashlib.sha256(output.encode()).hexdigest() if output is not None else None,
            len(output) if output is not None else None, error))

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def output_text(body: bytes) -> str | None:
    """The answer's text (chat: message content; completions: text), for its hash and length."""
    try:
        choice = orjson.loads(body)["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    if isinstance(choice.get("message"), dict):
        return choice["message"].get("content") or ""
    return choice.get("text") or ""

"""HostedCatalog: which hosted model ids exist, which are retired or retiring, and what a route's request is
sent as (reference/moonshot-api.md §0, §1 "Model IDs", §6.5).

A route's id goes through the backend's `models` mapping (the successor of a retired id is named there, by
the operator); an id that is retired and not mapped is refused with a 404 that names the retirement, never
swapped silently for another generation. A mapped request from a client that named a hosted generation
says so (`model=<id>` in x-kimi-adjusted). Retirement dates: the ones below (from reference/) plus the
backend's `retirements`; ahead of a date the driver logs a warning and the gateway's gauge counts down.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Mapping

from backends.errors import ModelRetiredError
from backends.generations import Generation, generation, generation_of_model

D = dt.date
# Sunset dates from the platform's model list (§0, §1). Prefixes cover a family's variants.
KNOWN_RETIREMENTS: tuple[tuple[str, dt.date], ...] = (
    ("kimi-k2.5", D(2026, 8, 31)),
    ("moonshot-v1-", D(2026, 8, 31)),
    ("kimi-k2-0711-preview", D(2026, 5, 25)), ("kimi-k2-0905-preview", D(2026, 5, 25)),
    ("kimi-k2-turbo-preview", D(2026, 5, 25)), ("kimi-k2-thinking", D(2026, 5, 25)),
    ("kimi-latest", D(2026, 1, 28)),
    ("kimi-thinking-preview", D(2025, 11, 11)),
)


EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


class HostedCatalog:
    def __init__(self, backend: str, models: Mapping[str, str], *, retirements: Mapping[str, dt.date] | None = None,
                 generations: Mapping[str, str] | None = None, warning_days: int = 60) -> None:
        self.backend = backend
        self.models = dict(models)                   # route -> hosted id
        self.retirements = dict(retirements or {})   # hosted id -> date (configured; wins over the table)
        self.generations = {model: generation(name) for model, name in (generations or {}).items()}
        self.warning_days = warning_days
        self.available: set[str] | None = None       # the last /v1/models listing; None = never read
        self.in_use: set[str] = set(self.models.values())   # ids sent (or about to be): warned about
        self._resolved: dict[str, tuple[int, tuple[str, str | None, Generation]]] = {}   # route -> (day, answer)

    def retirement(self, model: str) -> dt.date | None:
        if model in self.retirements:
            return self.retirements[model]
        for prefix, date in KNOWN_RETIREMENTS:
            if model.startswith(prefix) and (prefix.endswith("-") or model == prefix
                                             or model.startswith(prefix + "-")):
                return date
        return None

    def retired(self, model: str, on: dt.date) -> bool:
        """Past its date, or not listed any more by a server that still lists others while it has a date."""
        date = self.retirement(model)
        if date is None:
            return False
        return date <= on or (self.available is not None and bool(self.available) and model not in self.available)

    def generation_of(self, model: str) -> Generation:
        """A configured generation, else the one the id names, else K2.5's (the form every K2 id accepts)."""
        return self.generations.get(model) or generation_of_model(model) or generation("k2.5")

    def resolve(self, route: str, on: dt.date | None = None) -> tuple[str, str | None, Generation]:
        """(hosted id, adjustment or None, its generation) for a route, or ModelRetiredError (a 404).
        Cached per route and UTC day (one dict lookup on the hot path); a new listing clears the cache."""
        day = on.toordinal() if on is not None else int(time.time() // 86400) + EPOCH_ORDINAL
        cached = self._resolved.get(route)
        if cached is not None and cached[0] == day:
            return cached[1]
        on = on or dt.date.fromordinal(day)
        hosted = self.models.get(route, route)
        if self.retired(hosted, on):
            date = self.retirement(hosted)
            raise ModelRetiredError(
                f"The hosted model '{hosted}' was retired on {date.isoformat()} (Moonshot's sunset); the gateway "
                f"does not swap it for another generation silently. Ask for a current model, or have the operator "
                f"map '{route}' to its successor (kimi-k2.6 or kimi-k3) in the models of backend '{self.backend}'.",
                backend=self.backend, model=route)
        named = generation_of_model(route) is not None or self.retirement(route) is not None
        adjustment = f"model={hosted}" if hosted != route and named else None
        self.in_use.add(hosted)
        result = (hosted, adjustment, self.generation_of(hosted))
        self._resolved[route] = (day, result)
        return result

    def take_listing(self, ids: set[str]) -> None:
        self.available = ids
        self._resolved.clear()

    def notices(self, on: dt.date | None = None) -> list[tuple[str, dt.date, int]]:
        """(model, date, days left) for every id in use that has a retirement date; negative: past."""
        on = on or today()
        found = []
        for model in sorted(self.in_use):
            date = self.retirement(model)
            if date is not None:
                found.append((model, date, (date - on).days))
        return found

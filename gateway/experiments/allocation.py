"""Thompson sampling over an experiment's variants: each variant's weight is the posterior probability that
it is the best, from Beta(1 + successes, 1 + failures) on its feedback (a boolean label, or a score in [0, 1]
counted as a fractional success), mixed with a floor so that every variant keeps learning."""
from __future__ import annotations

from typing import Mapping

import numpy as np

DRAWS = 20_000


def thompson_weights(outcomes: Mapping[str, tuple[float, int]], floor: float,
                     rng: np.random.Generator | None = None) -> dict[str, float]:
    """`outcomes`: variant -> (successes, trials). Weights sum to 1; each is at least `floor`."""
    rng = rng or np.random.default_rng()
    names = list(outcomes)
    draws = np.stack([rng.beta(1 + s, 1 + max(n - s, 0), DRAWS) for s, n in outcomes.values()])
    best = np.bincount(np.argmax(draws, axis=0), minlength=len(names)) / DRAWS
    floor = min(floor, 1 / len(names))
    weights = floor + (1 - floor * len(names)) * best
    return {name: float(w) for name, w in zip(names, weights)}

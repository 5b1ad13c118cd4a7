"""The canary guard's rule, pure: is a candidate worse than the control by more than the route's margins?

It compares what each variant served since the candidate's weight last changed, once both have the guard's
minimum sample: the error rate (5xx) difference, and the TTFT p95 ratio (time to the first streamed event;
for a non-stream answer, the time to the answer). The service (service.py) acts on a verdict: weight 0,
persisted, an event, a metric and a log line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gateway.experiments.config import GuardConfig
from gateway.experiments.store import FactRow


@dataclass(frozen=True)
class Verdict:
    reason: str          # "error_rate" | "ttft_p95" (the metric label)
    detail: str          # for the log, the event and the report


@dataclass(frozen=True)
class Sample:
    n: int
    error_rate: float
    ttft_p95: float

    @classmethod
    def of(cls, rows: Sequence[FactRow]) -> Sample:
        if not rows:
            return cls(0, 0.0, 0.0)
        errors = sum(r.status >= 500 for r in rows)
        # TTFT of the answers that came: a failure's time to its error says nothing about speed.
        ttft = [r.ttft_s if r.ttft_s is not None else r.latency_s for r in rows if r.status < 500]
        return cls(len(rows), errors / len(rows), float(np.percentile(ttft, 95)) if ttft else 0.0)


def judge(guard: GuardConfig, control: Sample, candidate: Sample) -> Verdict | None:
    if not guard.enabled or candidate.n < guard.min_requests or control.n < guard.min_requests:
        return None
    delta = candidate.error_rate - control.error_rate
    if delta > guard.max_error_rate_delta:
        return Verdict("error_rate", f"error rate {candidate.error_rate:.3f} against the control's "
                       f"{control.error_rate:.3f} (+{delta:.3f} > +{guard.max_error_rate_delta:g}) over "
                       f"{candidate.n} requests")
    if control.ttft_p95 > 0 and candidate.ttft_p95 > guard.max_ttft_p95_ratio * control.ttft_p95:
        ratio = candidate.ttft_p95 / control.ttft_p95
        return Verdict("ttft_p95", f"TTFT p95 {candidate.ttft_p95:.3f} s against the control's {control.ttft_p95:.3f} s "
                       f"(x{ratio:.2f} > x{guard.max_ttft_p95_ratio:g}) over {candidate.n} requests")
    return None

"""An experiment's config (a route's `experiment:` block, and the body of `PUT /admin/routes/{name}`) and the
gateway-wide `experiments:` block (request facts: retention, queue, batches)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from backends.config import Name, Strict


class GuardConfig(Strict):
    """Canary rollback: a candidate whose error rate or TTFT p95 is worse than the control's by these margins,
    once both have `min_requests` since its weight last changed, gets weight 0."""
    enabled: bool = True
    min_requests: int = Field(200, ge=1)
    max_error_rate_delta: float = Field(0.05, ge=0, le=1)     # candidate error rate - control error rate
    max_ttft_p95_ratio: float = Field(1.5, gt=1)              # candidate TTFT p95 / control TTFT p95


class ShadowLimits(Strict):
    """Shadow calls never wait: past either limit a mirror is dropped (and counted)."""
    max_concurrency: int = Field(4, ge=1)          # this experiment's shadow calls in flight
    backend_share: float = Field(0.25, gt=0, le=1)  # of each backend's max_connections
    timeout_s: float = Field(60.0, gt=0)


class AllocationConfig(Strict):
    """`fixed`: the weights as written. `thompson`: weights follow Thompson sampling over the variants'
    feedback (booleans, or scores in [0, 1] as fractional successes), each variant kept at `floor` or more."""
    mode: Literal["fixed", "thompson"] = "fixed"
    floor: float = Field(0.05, ge=0, lt=1)
    interval_s: float = Field(60.0, gt=0)


MAX_WEIGHT = 1_000_000   # weights are shares: a bigger number says nothing more, and past ~1e308 it breaks the split
Weight = Annotated[int, Field(ge=0, le=MAX_WEIGHT)]


class ExperimentConfig(Strict):
    sticky_by: Literal["user", "header", "key"] = "user"
    variants: dict[Name, Weight] = Field(min_length=1)         # the first one is the control
    shadow: dict[Name, float] = Field(default_factory=dict)    # mirrored fraction of requests, per candidate
    shadow_limits: ShadowLimits = ShadowLimits()
    guard: GuardConfig = GuardConfig()
    allocation: AllocationConfig = AllocationConfig()

    @field_validator("variants")
    @classmethod
    def _positive_weights(cls, variants: dict[str, int]) -> dict[str, int]:
        if any(weight < 0 for weight in variants.values()) or sum(variants.values()) <= 0:
            raise ValueError("variant weights must be >= 0 and sum to more than 0")
        return variants

    @field_validator("shadow")
    @classmethod
    def _fractions(cls, shadow: dict[str, float]) -> dict[str, float]:
        for name, fraction in shadow.items():
            if not 0 < fraction <= 1:
                raise ValueError(f"shadow fraction of {name!r} must be in (0, 1]")
        return shadow

    @model_validator(mode="after")
    def _shadow_is_not_a_variant(self) -> ExperimentConfig:
        both = sorted(set(self.shadow) & set(self.variants))
        if both:
            raise ValueError(f"{both} cannot be both a variant and a shadow (a shadow never answers clients)")
        return self

    @property
    def control(self) -> str:
        return next(iter(self.variants))


class ExperimentsConfig(Strict):
    """Request facts (route, variant, version, latency, TTFT, tokens, status) by request id, for feedback
    and reports; written off the hot path in batches."""
    record: Literal["all", "experiments"] = "all"   # experiments: only requests to experiment routes leave facts
    retention_days: float = Field(30.0, gt=0)
    queue_size: int = Field(10000, ge=1)          # facts waiting to be written; past it they are dropped, counted
    batch_size: int = Field(500, ge=1)
    flush_interval_s: float = Field(0.5, gt=0)
    guard_interval_s: float = Field(1.0, gt=0)    # the guard looks at most this often
    sync_interval_s: float = Field(5.0, gt=0)     # route changes made by other replicas are picked up this often

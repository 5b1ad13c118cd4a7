"""The config pieces every `launch:` block shares: how a supervised server is restarted and how its log rotates
(backends/launchers/supervisor.py reads them)."""
from __future__ import annotations

from pydantic import Field, model_validator

from backends.config import Strict
from backends.launchers.supervisor import RestartPolicy


class RestartConfig(Strict):
    """A crashed server is restarted after backoff_initial_s, doubling per crash up to backoff_max_s; more than
    max_crashes crashes within window_s is a crash loop and the server stays down."""
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    max_crashes: int = Field(5, ge=0)
    window_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RestartConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    def policy(self) -> RestartPolicy:
        return RestartPolicy(self.backoff_initial_s, self.backoff_max_s, self.max_crashes, self.window_s)


class LogConfig(Strict):
    max_bytes: int = Field(50 * 1024 * 1024, ge=4096)
    backups: int = Field(3, ge=0)

"""What every backend kind's config shares (name, endpoints, timeouts, retries, key); each kind's own model
lives beside its driver and the discriminated union over `kind` is built in backends/factory.py."""
from __future__ import annotations

import re
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Names become route names, metric labels and URL path segments: keep them to a safe charset.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"
Name = Annotated[str, Field(pattern=SAFE_NAME)]
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
EnvName = Annotated[str, Field(pattern=ENV_NAME)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def env_name_not_secret(value: object, field: str) -> object:
    """A secret pasted where an env-var name belongs must fail without echoing it."""
    if isinstance(value, str) and not re.match(ENV_NAME, value):
        raise ValueError(f"expected the NAME of an environment variable (like TEAM_KEY), not a value: secrets "
                         f"never go in the config file; put it in the environment and write `{field}: NAME`")
    return value


class TimeoutsConfig(Strict):
    connect_s: float = Field(3.0, gt=0)
    first_byte_s: float = Field(300.0, gt=0)    # request sent -> first event (a stream's first data:), not the head
    idle_s: float = Field(120.0, gt=0)          # between events after the first
    health_s: float = Field(25.0, gt=0)         # a health probe, on its own connection; > SGLang's own 20 s


class RetryBudgetConfig(Strict):
    """Retries as a share of traffic, so that retries cannot amplify an outage (backends/retry_budget.py)."""
    ratio: float = Field(0.2, ge=0, le=10)        # retries allowed per request over the window
    min_per_s: float = Field(5.0, ge=0)           # a floor, so that a quiet backend can still retry
    window_s: float = Field(10.0, gt=0, le=600)


class RetryConfig(Strict):
    attempts: int = Field(2, ge=1, le=10)       # per target, before falling back to the next one
    max_retry_after_s: float = Field(5.0, ge=0)  # a longer retry-after goes straight to fallback
    budget: RetryBudgetConfig = RetryBudgetConfig()


class OutlierConfig(Strict):
    """Passive outlier detection (backends/outliers.py): a replica that fails is ejected, probed, readmitted."""
    consecutive_failures: int = Field(3, ge=1)     # connect errors, 5xx or resets before the first byte, in a row
    failure_ratio: float = Field(0.5, gt=0, le=1)  # ... or this share of requests over ratio_window_s
    min_requests: int = Field(10, ge=1)            # the ratio counts only with at least this many requests
    ratio_window_s: float = Field(10.0, gt=0)
    ejection_s: float = Field(1.0, gt=0)           # first probe after this; doubles per ejection, up to max
    max_ejection_s: float = Field(10.0, gt=0)
    max_ejected_percent: int = Field(50, ge=0, le=100)   # never more replicas than this share (and never all)

    @model_validator(mode="after")
    def _ejection_within_max(self) -> OutlierConfig:
        if self.ejection_s > self.max_ejection_s:
            raise ValueError(f"ejection_s ({self.ejection_s:g}) is longer than max_ejection_s "
                             f"({self.max_ejection_s:g}), which caps it")
        return self


class BackendConfigBase(Strict):
    """Fields of every kind. Subclasses set `kind` (a Literal) and the class facts below."""

    adapter_artifact: ClassVar[str | None] = None   # what an adapter needs here: "source" (PEFT dir), "gguf" or None
    default_vision: ClassVar[bool] = True

    name: Name
    url: str | None = None
    urls: tuple[str, ...] | None = None
    api_key_env: EnvName | None = None
    vision: bool | None = None                   # None = the kind's default
    max_connections: int = Field(100, ge=1)
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retry: RetryConfig = RetryConfig()
    max_concurrency: int | None = Field(None, ge=1)   # per replica; None: the server's own (slots), else unbounded
    outliers: OutlierConfig = OutlierConfig()

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _a_name_not_a_secret(cls, value: object) -> object:
        return env_name_not_secret(value, "api_key_env")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_of_url_urls(self):
        if (self.url is None) == (self.urls is None):
            raise ValueError("give exactly one of `url` (one server) or `urls` (replicas)")
        for url in self.urls or ():
            self._http_url(url)
        return self

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.urls if self.urls is not None else (self.url,)  # type: ignore[return-value]

    @property
    def has_vision(self) -> bool:
        return self.vision if self.vision is not None else self.default_vision

"""The `logging:` and `tracing:` config blocks (docs/observability.md): what the gateway writes about each
request, and where its spans go. Both default to the cheap, safe choice: JSON lines without prompts, no tracing."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from backends.config import EnvName, Strict, env_name_not_secret


class LoggingConfig(Strict):
    format: Literal["json", "text"] = "json"     # json: one object per line, for Loki/Elastic/Cloud Logging
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True                      # one line per data-plane request (gateway/access_log.py)
    include_prompts: bool = False                # the request's messages/prompt in its access line (personal data!)


class TracingConfig(Strict):
    """OpenTelemetry spans exported by OTLP/HTTP (protobuf). Absent = no tracing at all (incoming `traceparent`
    is still forwarded to the backend, so an upstream's traces join the caller's)."""
    endpoint: str                                # e.g. http://otel-collector:4318/v1/traces
    service_name: str = "kimi-gateway"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)   # for traces this gateway starts; a caller's decision wins
    headers_env: EnvName | None = None           # `Name=value,...` for the collector (an auth token), from the env

    @field_validator("headers_env", mode="before")
    @classmethod
    def _a_name_not_a_secret(cls, value: object) -> object:
        return env_name_not_secret(value, "headers_env")

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http(s) URL of an OTLP/HTTP traces endpoint, like "
                             "http://otel-collector:4318/v1/traces")
        return value

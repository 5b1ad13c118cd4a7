"""GatewayConfig: the strict, immutable YAML config (DESIGN.md "Config file") and load_config(path)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError, field_validator, model_validator

from adapters.models import AdapterSpec, Name

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
EnvName = Annotated[str, Field(pattern=ENV_NAME)]
ImageURLMode = Literal["fetch", "forward"]  # gateway/policies/content.py: who fetches a client's http(s) image


class ConfigError(Exception):
    """A config that cannot be used; the message names the file, the key path and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class ClientKeyConfig(Strict):
    name: Name
    key_env: EnvName
    models: tuple[str, ...] = ("*",)
    rpm: int | None = Field(None, ge=1)       # requests per minute
    tpm: int | None = Field(None, ge=1)       # tokens per minute, charged as prompt estimate + max_tokens

    @field_validator("key_env", mode="before")
    @classmethod
    def _a_name_not_a_secret(cls, value: object) -> object:
        return _env_name_not_secret(value, "key_env")


class AuthConfig(Strict):
    admin_keys_env: EnvName = "KIMI_GATEWAY_ADMIN_KEYS"
    client_keys: tuple[ClientKeyConfig, ...] | None = None  # None (and no key_file) = open gateway (development)
    key_file: str | None = None                # hashed keys: [{name, sha256, models, rpm, tpm}]


def _env_name_not_secret(value: object, field: str) -> object:
    """A secret pasted where an env-var name belongs must fail without echoing it."""
    if isinstance(value, str) and not re.match(ENV_NAME, value):
        raise ValueError(f"expected the NAME of an environment variable (like TEAM_KEY), not a value: secrets "
                         f"never go in the config file; put it in the environment and write `{field}: NAME`")
    return value


class SamplingProfile(Strict):
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float | None = Field(0.01, ge=0.0, le=1.0)
    thinking: bool = True


DEFAULT_PROFILES = {
    "thinking": SamplingProfile(temperature=1.0, top_p=0.95, min_p=0.01, thinking=True),
    "instant": SamplingProfile(temperature=0.6, top_p=0.95, min_p=0.01, thinking=False),
}


class SamplingConfig(Strict):
    mode: Literal["default", "enforce"] = "default"
    default_profile: str = "thinking"
    profiles: dict[str, SamplingProfile] = Field(default_factory=lambda: dict(DEFAULT_PROFILES))

    @model_validator(mode="after")
    def _default_profile_exists(self) -> SamplingConfig:
        if self.default_profile not in self.profiles:
            raise ValueError(f"default_profile {self.default_profile!r} is not one of profiles {sorted(self.profiles)}")
        return self


class TimeoutsConfig(Strict):
    connect_s: float = Field(3.0, gt=0)
    first_byte_s: float = Field(300.0, gt=0)
    idle_s: float = Field(120.0, gt=0)


class RetryConfig(Strict):
    attempts: int = Field(2, ge=1, le=10)       # per target, before falling back to the next one
    max_retry_after_s: float = Field(5.0, ge=0)  # a longer retry-after goes straight to fallback


class BackendConfig(Strict):
    name: Name
    kind: Literal["sglang", "llamacpp", "moonshot"]
    url: str | None = None
    urls: tuple[str, ...] | None = None
    api_key_env: EnvName | None = None

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _a_name_not_a_secret(cls, value: object) -> object:
        return _env_name_not_secret(value, "api_key_env")
    served_model_name: str | None = None        # sglang: its --served-model-name
    models: dict[str, str] = Field(default_factory=dict)  # moonshot: route model -> hosted id
    max_loaded_adapters: int | None = Field(None, ge=1)
    expert_adapter: Name | None = None           # sglang+KT: the one expert adapter fixed at launch
    vision: bool | None = None                   # None = the kind's default
    max_connections: int = Field(100, ge=1)
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retry: RetryConfig = RetryConfig()
    launch: dict | None = None                   # launch blocks are read by `kimi-gateway launch`

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_of_url_urls(self) -> BackendConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give exactly one of `url` (one server) or `urls` (replicas)")
        for url in self.urls or ():
            self._http_url(url)
        if self.kind == "moonshot" and not self.api_key_env:
            raise ValueError("a moonshot backend needs `api_key_env` (the name of the env var holding the key)")
        return self

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.urls if self.urls is not None else (self.url,)  # type: ignore[return-value]

    @property
    def has_vision(self) -> bool:
        return self.vision if self.vision is not None else self.kind != "llamacpp"


AdapterConfig = AdapterSpec  # a config `adapters:` entry is exactly an adapter spec


class ExperimentConfig(Strict):
    sticky_by: Literal["user", "header", "key"] = "user"
    variants: dict[Name, int] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _positive_weights(cls, variants: dict[str, int]) -> dict[str, int]:
        if any(weight < 0 for weight in variants.values()) or sum(variants.values()) <= 0:
            raise ValueError("variant weights must be >= 0 and sum to more than 0")
        return variants


class AgentConfig(Strict):
    """What to do where the hosted API's thinking rules would refuse an agent's request (DESIGN.md)."""
    forced_tool_choice: Literal["downgrade", "instant", "reject"] = "downgrade"
    missing_reasoning: Literal["instant", "reject", "forward"] = "instant"  # forward: let the backend decide
    strip_reasoning: bool = False


class ReasoningMemoryConfig(Strict):
    enabled: bool = True
    max_entries: int = Field(10000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    ttl_s: float = Field(3600.0, gt=0)


class RouteConfig(Strict):
    name: Name
    targets: tuple[Name, ...] | None = None       # backends, in fallback order
    experiment: ExperimentConfig | None = None
    profile: str | None = None
    agent: AgentConfig = AgentConfig()
    image_urls: ImageURLMode | None = None        # None = limits.image_urls

    @model_validator(mode="after")
    def _targets_or_experiment(self) -> RouteConfig:
        if (self.targets is None) == (self.experiment is None):
            raise ValueError("a route has exactly one of `targets` or `experiment`")
        return self


class LimitsConfig(Strict):
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_messages: int = Field(2048, ge=1)
    max_tokens: int = Field(65536, ge=1)
    max_data_url_bytes: int = Field(10 * 1024 * 1024, ge=1)
    allow_private_image_urls: bool = False     # image URLs may reach any address (SSRF: only on a closed network)
    private_image_networks: tuple[IPvAnyNetwork, ...] = ()  # private networks trusted as if public (image stores)
    image_urls: ImageURLMode = "fetch"         # routes without their own `image_urls` get this
    max_image_urls: int = Field(32, ge=0)      # http(s) image URLs in one request
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1)   # one fetched image
    image_fetch_timeout_s: float = Field(10.0, gt=0)      # all of one request's fetches: DNS, redirects, bodies
    image_fetch_concurrency: int = Field(4, ge=1, le=64)  # fetches at once, per request
    image_fetch_redirects: int = Field(3, ge=0, le=10)
    image_url_ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()  # forward mode: ports besides 80/443
    unknown_fields: Literal["reject", "forward"] = "reject"
    forward_fields: tuple[str, ...] = ()       # forwarded as-is even when unknown_fields is reject


class GatewayConfig(Strict):
    listen: ListenConfig = ListenConfig()
    admin_listen: ListenConfig | None = None   # the admin API on its own listener (then not on `listen`)
    state_dir: str = "~/.local/state/kimi-gateway"
    adapter_roots: tuple[str, ...] = ()
    auth: AuthConfig = AuthConfig()
    sampling: SamplingConfig = SamplingConfig()
    limits: LimitsConfig = LimitsConfig()
    reasoning_memory: ReasoningMemoryConfig = ReasoningMemoryConfig()
    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    adapters: tuple[AdapterConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    @model_validator(mode="after")
    def _cross_references(self) -> GatewayConfig:
        check_cross_references(self)
        return self

    def backend(self, name: str) -> BackendConfig:
        return next(b for b in self.backends if b.name == name)


def check_cross_references(config: GatewayConfig) -> None:
    """Names must be unique and every reference must resolve; errors carry the key path."""
    backends = {b.name: b for b in config.backends}
    _unique("backends", [b.name for b in config.backends])
    _unique("adapters", [a.name for a in config.adapters])
    route_names = [r.name for r in config.routes] + [a.name for a in config.adapters]
    _unique("routes (adapters are routes too)", route_names)
    profiles = config.sampling.profiles
    for i, adapter in enumerate(config.adapters):
        check_adapter_references(adapter, config, f"adapters[{i}]")
    adapter_names = {a.name for a in config.adapters}
    for i, route in enumerate(config.routes):
        if route.profile and route.profile not in profiles:
            raise ValueError(f"routes[{i}].profile: {route.profile!r} is not a sampling profile ({sorted(profiles)})")
        for j, name in enumerate(route.targets or ()):
            if name not in backends:
                raise ValueError(f"routes[{i}].targets[{j}]: {name!r} is not a backend ({sorted(backends)})")
        for name in (route.experiment.variants if route.experiment else {}):
            if name not in adapter_names and name not in {r.name for r in config.routes if r.targets}:
                raise ValueError(f"routes[{i}].experiment.variants: {name!r} is not an adapter or a base route")


def check_adapter_references(adapter: AdapterConfig, config: GatewayConfig, where: str) -> None:
    """An adapter's profile and backends must exist, and each backend kind must be able to serve it."""
    backends = {b.name: b for b in config.backends}
    profiles = config.sampling.profiles
    if adapter.profile and adapter.profile not in profiles:
        raise ValueError(f"{where}.profile: {adapter.profile!r} is not a sampling profile ({sorted(profiles)})")
    for j, name in enumerate(adapter.backends):
        backend = backends.get(name)
        if backend is None:
            raise ValueError(f"{where}.backends[{j}]: {name!r} is not a backend ({sorted(backends)})")
        if backend.kind == "moonshot":
            raise ValueError(f"{where}.backends[{j}]: {name!r} is the hosted API, which serves no LoRA")
        if backend.kind == "llamacpp" and not adapter.gguf:
            raise ValueError(f"{where}: backend {name!r} is llama.cpp, so the adapter needs `gguf`")
        if backend.kind == "sglang" and not adapter.source:
            raise ValueError(f"{where}: backend {name!r} is SGLang, so the adapter needs `source`")


def _unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what}: the name {name!r} is used twice")
        seen.add(name)


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a YAML config; every failure is a ConfigError naming file, key path and expectation."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_describe(error) for error in exc.errors())) from exc


SECRET_WORDS = ("key", "secret", "token", "password")


def _describe(error: dict) -> str:
    """One error as `key.path: what was expected`; never the offending value (it may be a secret)."""
    location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        name = str(error["loc"][-1]).lower()
        if any(word in name for word in SECRET_WORDS):
            return f"{location}: unknown key; secrets never go in the config file: name an env var with `*_env`"
        return f"{location}: unknown key"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def resolve_secret(env_name: str) -> str | None:
    """Secrets live in the environment; the config only names the variable."""
    value = os.environ.get(env_name, "").strip()
    return value or None

"""GatewayConfig: the strict, immutable YAML config (DESIGN.md "Config file") and load_config(path).

Strict means unknown keys are errors; scalars are read in pydantic's lax mode, on purpose. YAML already types
every unquoted scalar (`30`, `0.5`, `true`), so lax mode only reads values someone quoted (`timeout_s: "30"`),
which have one meaning, and config files written by templating tools that quote values keep loading. The admin
API reads the same models strictly (gateway/control_body.py `strict_body`): there a string where a number
belongs is a client's type bug, which a JSON API should report rather than guess around.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, IPvAnyNetwork, ValidationError, field_validator, model_validator

from adapters.models import AdapterSpec
from backends.config import EnvName, Name, Strict, env_name_not_secret
from backends.factory import KINDS, BackendConfig
from gateway.telemetry_config import LoggingConfig, TracingConfig
from gateway.experiments.config import ExperimentConfig, ExperimentsConfig  # noqa: F401 (re-exported)

ImageURLMode = Literal["fetch", "forward"]  # gateway/policies/content.py: who fetches a client's http(s) image
MAX_DEADLINE_MS = 86_400_000   # a day: the most `x-kimi-deadline-ms` (and a route's `deadline_ms`) may say
Priority = Literal["high", "normal", "low"]  # admission classes (gateway/policies/admission.py), served in this order


class ConfigError(Exception):
    """A config that cannot be used; the message names the file, the key path and what was expected."""


class ListenConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class ClientKeyConfig(Strict):
    name: Name
    key_env: EnvName
    models: tuple[str, ...] = ("*",)
    rpm: int | None = Field(None, ge=1)       # requests per minute
    tpm: int | None = Field(None, ge=1)       # tokens per minute, charged as prompt estimate + max_tokens
    priority: Priority = "normal"             # its admission class; `x-kimi-priority` may lower it, never raise it

    @field_validator("key_env", mode="before")
    @classmethod
    def _a_name_not_a_secret(cls, value: object) -> object:
        return env_name_not_secret(value, "key_env")


class AuthConfig(Strict):
    admin_keys_env: EnvName = "KIMI_GATEWAY_ADMIN_KEYS"
    client_keys: tuple[ClientKeyConfig, ...] | None = None  # None (and no key_file) = open gateway (development)
    key_file: str | None = None                # hashed keys: [{name, sha256, models, rpm, tpm}]


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


class BaseModelConfig(Strict):
    """What the adapters were trained on: its dimensions check every adapter's tensor shapes (422 otherwise)."""
    hf_config: str | None = None     # the base model's config.json (Kimi K2.5 nests the text model)
    gguf: str | None = None          # a base GGUF: its metadata and tensor shapes


class ConversionConfig(Strict):
    """The Pythons that run the real converters, each with its own deps (`kimi-gateway setup converters`
    makes both venvs and prints these lines); adapters/conversion.py runs them as subprocesses."""
    llama_cpp_python: str | None = None   # convert_lora_to_gguf.py: torch, transformers, gguf
    llama_cpp_dir: str | None = None      # holds convert_lora_to_gguf.py; default: the copy setup cached
    kt_python: str | None = None          # convert_kt_to_sglang_adapter.py (kt-kernel): torch, safetensors
    timeout_s: float = Field(1800.0, gt=0)
    cache_dir: str | None = None          # converted artifacts by content hash; default <state_dir>/converted


AdapterConfig = AdapterSpec  # a config `adapters:` entry is exactly an adapter spec


class AgentConfig(Strict):
    """What to do where the hosted API's thinking rules would refuse an agent's request (DESIGN.md)."""
    forced_tool_choice: Literal["downgrade", "instant", "reject"] = "downgrade"
    # forward: let the backend decide; placeholder: a non-empty stand-in (never "": K2.6 reads it as missing)
    missing_reasoning: Literal["instant", "reject", "forward", "placeholder"] = "instant"
    strip_reasoning: bool = False


class ReasoningMemoryConfig(Strict):
    enabled: bool = True
    max_entries: int = Field(10000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    ttl_s: float = Field(3600.0, gt=0)
    tenant_max_bytes: int = Field(8 * 1024 * 1024, ge=1024)   # shared (Redis) memory: the bound per tenant


class StoreConfig(Strict):
    """Where the adapter registry lives: SQLite in state_dir (one replica), or PostgreSQL shared by a fleet."""
    kind: Literal["sqlite", "postgres"] = "sqlite"
    dsn_env: EnvName | None = None              # postgres: the env var holding the DSN (it may carry a password)
    pool_size: int = Field(4, ge=1, le=64)

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> StoreConfig:
        if self.kind == "postgres" and self.dsn_env is None:
            raise ValueError("a postgres store needs `dsn_env`, the env var that holds its DSN")
        if self.kind == "sqlite" and self.dsn_env is not None:
            raise ValueError("`dsn_env` is for kind: postgres (sqlite lives in state_dir)")
        return self


class SharedConfig(Strict):
    """Where per-request, short-lived state lives: in this process, or in Redis shared by a fleet."""
    kind: Literal["local", "redis"] = "local"
    url_env: EnvName | None = None              # redis: the env var holding its URL
    key_prefix: str = Field("kimi-gateway", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    replicas: int = Field(1, ge=1)              # fleet size assumed for the per-replica share until Redis said
    timeout_s: float = Field(0.5, gt=0, le=5)   # one Redis call; past it the replica serves degraded

    @model_validator(mode="after")
    def _url_for_redis(self) -> SharedConfig:
        if self.kind == "redis" and self.url_env is None:
            raise ValueError("a redis `shared` needs `url_env`, the env var that holds its URL")
        if self.kind == "local" and self.url_env is not None:
            raise ValueError("`url_env` is for kind: redis (kind: local keeps this state in the process)")
        return self


class RouteConfig(Strict):
    name: Name
    targets: tuple[Name, ...] | None = None       # backends, in fallback order
    experiment: ExperimentConfig | None = None
    profile: str | None = None
    agent: AgentConfig = AgentConfig()
    image_urls: ImageURLMode | None = None        # None = limits.image_urls
    timeout_s: float | None = Field(None, gt=0)   # the whole request, queue included; the backend is cancelled then
    deadline_ms: int | None = Field(None, ge=1, le=MAX_DEADLINE_MS)   # the default for `x-kimi-deadline-ms`

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


Exposure = Literal["public", "admin"]


class ExposureConfig(Strict):
    """Who may read the gateway's own introspection. `public`: anyone who reaches the main listener. `admin`:
    only the `admin_listen` listener serves it when there is one (no key needed there), else an admin key."""
    metrics: Exposure = "public"          # Prometheus scrapes without credentials; labels are config names only
    openapi: Exposure = "admin"           # /openapi.json: no client needs it, and it maps the admin API
    readyz_details: Exposure = "admin"    # /readyz per-backend states; its status code stays public


class ShutdownConfig(Strict):
    """SIGTERM (gateway/shutdown.py): /readyz 503 at once, new requests refused after grace_s, the process
    ends when the last request finished or at drain_deadline_s."""
    grace_s: float = Field(5.0, ge=0)
    drain_deadline_s: float = Field(600.0, gt=0)


class AdmissionConfig(Strict):
    """The queue in front of backends that declare `max_concurrency` (gateway/policies/admission.py)."""
    max_queue: int = Field(1000, ge=0)         # per backend; past it a request gets 429 (or the route's next target)
    keepalive_s: float = Field(10.0, gt=0)     # a queued stream gets its head and an SSE comment this often
    retry_after_s: int = Field(1, ge=1)        # the retry-after of a 429 from the queue


class GatewayConfig(Strict):
    listen: ListenConfig = ListenConfig()
    admin_listen: ListenConfig | None = None   # the admin API on its own listener (then not on `listen`)
    state_dir: str = "~/.local/state/kimi-gateway"
    store: StoreConfig = StoreConfig()
    shared: SharedConfig = SharedConfig()
    adapter_roots: tuple[str, ...] = ()
    adapter_drain_deadline_s: float = Field(600.0, gt=0)   # a swap waits this long for the old version's requests
    auth: AuthConfig = AuthConfig()
    sampling: SamplingConfig = SamplingConfig()
    limits: LimitsConfig = LimitsConfig()
    reasoning_memory: ReasoningMemoryConfig = ReasoningMemoryConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    conversion: ConversionConfig = ConversionConfig()
    exposure: ExposureConfig = ExposureConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig | None = None        # absent: no spans (docs/observability.md)
    shutdown: ShutdownConfig = ShutdownConfig()
    admission: AdmissionConfig = AdmissionConfig()
    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    adapters: tuple[AdapterConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    experiments: ExperimentsConfig = ExperimentsConfig()

    @model_validator(mode="after")
    def _cross_references(self) -> GatewayConfig:
        check_cross_references(self)
        return self

    def backend(self, name: str):
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
        for key in ("variants", "shadow"):
            for name in getattr(route.experiment, key) if route.experiment else {}:
                if name == route.name:
                    raise ValueError(f"routes[{i}].experiment.{key}: {name!r} is this experiment itself")
                if name not in adapter_names and name not in {r.name for r in config.routes if r.targets}:
                    raise ValueError(f"routes[{i}].experiment.{key}: {name!r} is not an adapter or a base route")


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
        artifact = backend.adapter_artifact
        if artifact is None:
            raise ValueError(f"{where}.backends[{j}]: {name!r} is a {backend.kind} backend, which serves no LoRA")
        if getattr(adapter, artifact) is None:
            if artifact == "gguf" and adapter.source is not None and config.conversion.llama_cpp_python:
                continue  # made from `source` by convert_lora_to_gguf.py (adapters/conversion.py)
            what = {"gguf": "a GGUF LoRA file, or `source` with conversion.llama_cpp_python set to convert it",
                    "source": "a PEFT dir"}[artifact]
            raise ValueError(f"{where}: backend {name!r} is {backend.kind}, so the adapter needs `{artifact}` ({what})")


def check_adapter_roots(config: GatewayConfig) -> None:
    """Each adapter root must be a directory here (`check` and `serve`, not every load: a config is also read
    where its paths are not, to launch or to test it). A typo would otherwise surface later, as every adapter
    under it refused for resolving "outside the adapter roots". Paths are taken as adapters/validation.py
    takes them: relative to the working directory, `~` expanded."""
    for i, root in enumerate(config.adapter_roots):
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ConfigError(f"adapter_roots[{i}]: {root} {'is not a directory' if path.exists() else 'does not exist'}")


def _unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what}: the name {name!r} is used twice")
        seen.add(name)


class StrictYamlLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently:
    a second `routes:` would replace the first)."""


def _mapping_once(loader: StrictYamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {str(key)[:64]!r} is given twice in "
                                                        "one mapping", key_node.start_mark)
            seen.add(key)
        except TypeError:   # an unhashable key: construct_mapping says so
            break
    return loader.construct_mapping(node, deep)


StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, then what (PyYAML's own text spans several, with the source quoted)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML{where}: {problem}"


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a YAML config; every failure is a ConfigError naming file, key path and expectation."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from exc
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least `backends:`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        errors = [_untagged(error) for error in exc.errors()]
        # A list whose items failed is also reported as too short: only the items' errors say anything.
        errors = [e for e in errors if not (e["type"] == "too_short" and any(
            o is not e and o["loc"][:len(e["loc"])] == e["loc"] for o in errors))]
        raise ConfigError(f"{path}: " + "; ".join(describe_error(error) for error in errors)) from exc


def _untagged(error: dict) -> dict:
    """Drop the union tag pydantic puts in the key path (`backends[0].llamacpp.url` -> `backends[0].url`)."""
    loc = error["loc"]
    loc = tuple(part for i, part in enumerate(loc) if not (part in KINDS and i and isinstance(loc[i - 1], int)))
    return {**error, "loc": loc}


SECRET_WORDS = ("key", "secret", "token", "password")


def key_path(loc: tuple) -> str:
    """pydantic's location as the config (or a body) spells it: `backends[0].retry.attempts`."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def describe_error(error: dict) -> str:
    """One error as `key.path: what was expected`; never the offending value (it may be a secret)."""
    location = key_path(error["loc"])
    if error["type"] == "extra_forbidden":
        name = str(error["loc"][-1]).lower()
        if any(word in name for word in SECRET_WORDS):
            return f"{location}: unknown key; secrets never go in the config file: name an env var with `*_env`"
        return f"{location}: unknown key"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = error.get("ctx", {}).get("tag", "")
        return f"{location}.kind: {tag!r} is not a backend kind (one of {', '.join(KINDS)})" if tag else \
            f"{location}.kind: required key is missing (one of {', '.join(KINDS)})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def resolve_secret(env_name: str) -> str | None:
    """Secrets live in the environment; the config only names the variable."""
    value = os.environ.get(env_name, "").strip()
    return value or None

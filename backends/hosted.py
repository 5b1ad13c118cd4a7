"""MoonshotDriver: the hosted Moonshot API (reference/moonshot-api.md). Base models only, fixed sampling
stripped instead of earning a 400, the thinking switch in the target generation's form (backends/generations.py),
model ids mapped and checked against retirements (backends/hosted_models.py).
"""
from __future__ import annotations

import datetime as dt
import logging
import re
import time
from typing import ClassVar, Literal, Mapping, Sequence

import orjson
from pydantic import Field, model_validator

from backends.base import BackendRequest
from backends.config import BackendConfigBase
from backends.errors import (
    BackendAccountError,
    BackendError,
    BackendProtocolError,
    BackendRateLimitedError,
    BackendRejectedError,
    BackendUnavailableError,
    UnsupportedFeatureError,
)
from backends.field_support import asks_for_any, check_n, check_unserved
from backends.generations import Generation, GenerationName, generation, generation_of_model
from backends.hosted_models import HostedCatalog, today
from backends.openai_compat import OpenAICompatDriver
from backends.protocol import CHAT_PATH, HOSTED_FIXED_SAMPLING, SAMPLING_EXTENSION_FIELDS

log = logging.getLogger(__name__)

# Retryable only where waiting helps (§4, §6.4): overload and per-minute limits, never quota or TPD.
RETRYABLE_429_TYPES = frozenset({"engine_overloaded_error", "rate_limit_reached_error"})
# The account itself is refused (§4): key, permission, model id; waiting does not help.
ACCOUNT_STATUSES = {401: "the gateway's hosted API key was refused (401)",
                    403: "the gateway's hosted account may not use this (403)",
                    404: "the hosted model id is not available (retired or not permitted)"}
TRY_AGAIN_AFTER = re.compile(r"after (\d+(?:\.\d+)?) seconds")
# Removed from every hosted body: the fixed sampling (§2.1; temperature and top_p are the sampling policy's,
# n above 1 is refused by check()), every thinking switch (the generation writes its own, and never two of
# them: §8), and the unset forms (false, 0, null) of the fields check() refuses when set.
HOSTED_STRIPPED = frozenset(HOSTED_FIXED_SAMPLING) | {"chat_template_kwargs", "logprobs", "top_logprobs",
                                                     "thinking", "reasoning_effort", "reasoning"}
# Put in an assistant tool-call turn whose reasoning nobody has, where the route's rule asks for it (or the
# target cannot turn thinking off): the least the API accepts (§3); never "", which K2.6 reads as missing (§8).
REASONING_PLACEHOLDER = " "


MAX_TOOLS = 128
# The documented pattern's lower bound is lost in the stored copy (§3): one leading letter or underscore.
FUNCTION_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")


class MoonshotConfig(BackendConfigBase):
    """The hosted Moonshot API: base models only, a key from the environment, route -> hosted model ids."""

    adapter_artifact: ClassVar[str | None] = None   # serves no LoRA

    kind: Literal["moonshot"]
    models: dict[str, str] = Field(default_factory=dict)  # route model -> hosted id (a retired id's successor)
    retirements: dict[str, dt.date] = Field(default_factory=dict)   # hosted id -> sunset date, beyond the known
    retirement_warning_days: int = Field(60, ge=0)        # log a warning this long before a date (gauge: always)
    generations: dict[str, GenerationName] = Field(default_factory=dict)  # hosted id -> generation, beyond the id
    models_refresh_s: float = Field(3600.0, gt=0)         # how often /v1/models is read again

    @model_validator(mode="after")
    def _needs_a_key(self) -> MoonshotConfig:
        if not self.api_key_env:
            raise ValueError("a moonshot backend needs `api_key_env` (the name of the env var holding the key)")
        return self

    @model_validator(mode="after")
    def _no_mapping_onto_a_retired_id(self) -> MoonshotConfig:
        catalog = self.catalog()
        for route, hosted in self.models.items():
            date = catalog.retirement(hosted)
            if date is not None and date <= today():
                raise ValueError(f"models.{route}: {hosted!r} was retired on {date.isoformat()}; map it to a "
                                 "current model (kimi-k2.6, kimi-k3)")
        return self

    def catalog(self) -> HostedCatalog:
        return HostedCatalog(self.name, self.models, retirements=self.retirements, generations=self.generations,
                             warning_days=self.retirement_warning_days)


def forced_tool_choice(choice: object) -> bool:
    """`required` or a named function: both refused by the hosted API while thinking (§2.2)."""
    return choice == "required" or isinstance(choice, dict)


def missing_reasoning(messages: list) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
               and not m.get("reasoning_content") for m in messages)


def apply_thinking_rules(body: dict, request: BackendRequest, gen: Generation) -> bool:
    """The thinking mode to send, after the route's rules met the hosted API's (reference §2.2, §3). A target
    that always thinks (K2.7-code, K3) cannot take the `instant` way out: there a forced tool_choice is
    downgraded and missing reasoning gets the placeholder. Every change is recorded in request.adjustments;
    a `reject` rule raises a 400 naming the rule."""
    thinking, rules = request.thinking or gen.always_thinks, request.rules
    if thinking and forced_tool_choice(body.get("tool_choice")):
        if rules.forced_tool_choice == "reject":
            raise BackendRejectedError("With thinking on, the hosted API accepts only tool_choice 'auto' or "
                                       "'none' (route rule: reject).", status=400, param="tool_choice")
        if rules.forced_tool_choice == "downgrade" or gen.always_thinks:
            body["tool_choice"] = "auto"
            request.adjustments.append("tool_choice=auto")
        else:
            thinking = False
            request.adjustments.append("thinking=off:tool_choice")
    if thinking and rules.missing_reasoning != "forward" and missing_reasoning(body.get("messages") or ()):
        if rules.missing_reasoning == "reject":
            raise BackendRejectedError("With thinking on, the hosted API needs the reasoning_content of every "
                                       "earlier assistant tool-call turn, and the gateway has none for at least "
                                       "one (route rule: reject).", status=400, param="messages")
        if rules.missing_reasoning == "placeholder" or gen.always_thinks:
            body["messages"] = with_placeholders(body["messages"])
            request.adjustments.append("reasoning=placeholder")
        else:
            thinking = False
            request.adjustments.append("thinking=off:reasoning_missing")
    return thinking


def with_placeholders(messages: list) -> list:
    """A copy of the history (the client's stays as it is, for the route's next target) in which each
    assistant tool-call turn without reasoning carries the placeholder."""
    return [{**m, "reasoning_content": REASONING_PLACEHOLDER}
            if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
            and not m.get("reasoning_content") else m for m in messages]


def check_tools(body: dict, backend: str) -> None:
    tools = body.get("tools") or []
    if len(tools) > MAX_TOOLS:
        raise UnsupportedFeatureError(f"The hosted API accepts at most {MAX_TOOLS} tools; this request has "
                                      f"{len(tools)}.", backend=backend, param="tools")
    for index, tool in enumerate(tools):
        name = (tool.get("function") or {}).get("name", "")
        if not FUNCTION_NAME.match(name):
            raise UnsupportedFeatureError(f"tools[{index}].function.name {name!r} does not match the hosted API's "
                                          f"pattern {FUNCTION_NAME.pattern}.", backend=backend,
                                          param=f"tools[{index}].function.name")


def to_moonshot_body(request: BackendRequest, hosted_model: str, gen: Generation | None = None) -> dict:
    gen = gen or generation_of_model(hosted_model) or generation("k2.5")
    body = {key: value for key, value in request.body.items() if key not in HOSTED_STRIPPED}
    body["model"] = hosted_model
    thinking = apply_thinking_rules(body, request, gen)
    # The API fixes these per generation and mode (§2.1) and refuses other values: they are left out (the
    # server applies its own), and a client value the server will not use is said so in x-kimi-adjusted.
    for name, fixed in gen.fixed_sampling(thinking).items():
        value = request.body.get(name)
        if value is not None and value != fixed:
            request.adjustments.append(f"{name}={fixed:g}")
    body.update(gen.hosted_switch(thinking, request.effort))
    return body


def hosted_error_fields(raw: bytes) -> tuple[str, str] | None:
    """(error.type, error.message) of the hosted error body; None when the body is not one (a proxy's page)."""
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    return str(error.get("type") or ""), str(error.get("message") or "")


def error_from_moonshot(status: int, headers: Mapping[str, str], raw: bytes, backend: str) -> BackendError:
    """By status and `error.type`, never by 429 alone (§4, §6.4): overload and per-minute limits are retried
    (after Retry-After, else the message's "{t} seconds", else backoff); quota, billing, TPD, key, permission
    and model errors never are. A 5xx is retried; a 4xx whose body is not the API's JSON is a broken answer."""
    fields = hosted_error_fields(raw)
    error_type, message = fields or ("", "")
    if status == 429:
        if error_type in RETRYABLE_429_TYPES and "TPD" not in message:
            return BackendRateLimitedError(message or "rate limited", backend=backend,
                                           retry_after_s=_retry_after(headers, message))
        return BackendAccountError(f"the hosted account cannot serve more ({error_type or 429})", backend=backend)
    if status >= 500:
        return BackendUnavailableError(f"the hosted API answered HTTP {status}", backend=backend)
    if fields is None:
        return BackendProtocolError(f"the hosted API answered HTTP {status} with a body that is not its error JSON",
                                    backend=backend)
    if status in ACCOUNT_STATUSES:
        return BackendAccountError(ACCOUNT_STATUSES[status], backend=backend)
    return BackendRejectedError(message or "The hosted API refused the request.", status=status, backend=backend,
                                error_type="invalid_request_error")


def _retry_after(headers: Mapping[str, str], message: str) -> float | None:
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    found = TRY_AGAIN_AFTER.search(message)
    return float(found.group(1)) if found else None


class MoonshotDriver(OpenAICompatDriver):
    kind = "moonshot"
    health_path = "/v1/models"

    def __init__(self, name: str, transports: Sequence, *, api_key: str | None, models: Mapping[str, str],
                 vision: bool = True, catalog: HostedCatalog | None = None, refresh_s: float = 3600.0) -> None:
        super().__init__(name, transports, vision=vision)
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.catalog = catalog or HostedCatalog(name, models)
        self.refresh_s = refresh_s
        self._refreshed_at: float | None = None

    @property
    def available(self) -> set[str] | None:
        return self.catalog.available

    def headers(self) -> dict[str, str]:
        return self._headers

    async def start(self) -> None:
        """Read the hosted ids at start (`kimi-k2.5` was retired on 2026-08-31, §0); the health loop reads
        them again every `models_refresh_s`."""
        await self.refresh_models()

    async def health(self) -> bool:
        healthy = await super().health()
        due = self._refreshed_at is None or time.monotonic() - self._refreshed_at >= self.refresh_s
        if healthy and due:
            await self.refresh_models()
        return healthy

    async def refresh_models(self) -> None:
        try:
            listing = await self.get_json(self._transports[0], "/v1/models")
            available = {card["id"] for card in listing.get("data", [])}
        except (BackendError, ValueError, KeyError, AttributeError, TypeError):
            return
        self._refreshed_at = time.monotonic()
        self.catalog.take_listing(available)
        for route, hosted in self.catalog.models.items():
            if hosted not in available:
                log.warning("backend %s: hosted model %r (for route %r) is not offered", self.name, hosted, route)
        self.warn_retirements()

    def warn_retirements(self) -> None:
        """Ahead of a sunset date, every refresh says so: the operator has `retirement_warning_days` to map
        the id to its successor before its requests become 404s."""
        for model, date, days in self.catalog.notices():
            if days < 0:
                log.error("backend %s: hosted model %r was retired on %s; its requests are refused (404) unless "
                          "a route maps it to a successor", self.name, model, date.isoformat())
            elif days <= self.catalog.warning_days:
                log.warning("backend %s: hosted model %r retires on %s (in %d days): map it to its successor in "
                            "`models`", self.name, model, date.isoformat(), days)

    def retirements(self) -> list[tuple[str, int]]:
        """(hosted id, days until its retirement) for the ids in use that have a date (a gauge)."""
        return [(model, days) for model, _, days in self.catalog.notices()]

    def hosted_model(self, route: str) -> str:
        return self.catalog.resolve(route)[0]

    def check(self, request: BackendRequest) -> None:
        super().check(request)
        if request.adapter is not None:
            raise UnsupportedFeatureError("The hosted API serves no LoRA adapters.", backend=self.name)
        hosted, _, gen = self.catalog.resolve(request.route)   # a retired, unmapped id: ModelRetiredError (404)
        if not request.thinking and gen.always_thinks:
            raise UnsupportedFeatureError(f"Hosted model '{hosted}' always thinks: instant mode is not available "
                                          "there.", backend=self.name, param="thinking")
        if request.path != CHAT_PATH:
            raise UnsupportedFeatureError("The hosted API serves chat completions only (no /v1/completions).",
                                          backend=self.name)
        for name in SAMPLING_EXTENSION_FIELDS:
            if name in request.body:
                raise UnsupportedFeatureError(f"The hosted API does not accept '{name}'.", backend=self.name, param=name)
        if asks_for_any(request.body):
            check_n(request.body, self.name, 1, "the hosted API fixes n at 1")
            check_unserved(request.body, self.name, ("logprobs", "top_logprobs"),
                           "the hosted API returns no log probabilities")
        check_tools(request.body, self.name)

    def to_body(self, request: BackendRequest, replica: int) -> dict:
        hosted, adjustment, gen = self.catalog.resolve(request.route)
        if adjustment is not None:
            request.adjustments.append(adjustment)
        return to_moonshot_body(request, hosted, gen)

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        return error_from_moonshot(status, headers, raw, self.name)

"""MoonshotDriver: the hosted Moonshot API (reference/moonshot-api.md). Base models only, fixed sampling
stripped instead of earning a 400, thinking as the top-level `thinking` field, model ids mapped.
"""
from __future__ import annotations

import logging
import re
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
# Hosted families that always think and refuse the `thinking` field (§1: kimi-k3 takes reasoning_effort).
ALWAYS_THINKING = ("kimi-k3",)
# Removed from every hosted body: the fixed sampling (§2.1; temperature and top_p are the sampling policy's,
# n above 1 is refused by check()), the self-hosted thinking switch, and the unset forms (false, 0, null) of
# the fields check() refuses when set.
HOSTED_STRIPPED = frozenset(HOSTED_FIXED_SAMPLING) | {"chat_template_kwargs", "logprobs", "top_logprobs"}
HOSTED_FIXED_PENALTIES = ("presence_penalty", "frequency_penalty")


MAX_TOOLS = 128
# The documented pattern's lower bound is lost in the stored copy (§3): one leading letter or underscore.
FUNCTION_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")


class MoonshotConfig(BackendConfigBase):
    """The hosted Moonshot API: base models only, a key from the environment, route -> hosted model ids."""

    adapter_artifact: ClassVar[str | None] = None   # serves no LoRA

    kind: Literal["moonshot"]
    models: dict[str, str] = Field(default_factory=dict)  # route model -> hosted id

    @model_validator(mode="after")
    def _needs_a_key(self) -> MoonshotConfig:
        if not self.api_key_env:
            raise ValueError("a moonshot backend needs `api_key_env` (the name of the env var holding the key)")
        return self


def forced_tool_choice(choice: object) -> bool:
    """`required` or a named function: both refused by the hosted API while thinking (§2.2)."""
    return choice == "required" or isinstance(choice, dict)


def missing_reasoning(messages: list) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
               and not m.get("reasoning_content") for m in messages)


def apply_thinking_rules(body: dict, request: BackendRequest) -> bool:
    """The thinking mode to send, after the route's rules met the hosted API's (reference §2.2, §3).
    Every change is recorded in request.adjustments; a `reject` rule raises a 400 naming the rule."""
    thinking, rules = request.thinking, request.rules
    if thinking and forced_tool_choice(body.get("tool_choice")):
        if rules.forced_tool_choice == "reject":
            raise BackendRejectedError("With thinking on, the hosted API accepts only tool_choice 'auto' or "
                                       "'none' (route rule: reject).", status=400, param="tool_choice")
        if rules.forced_tool_choice == "downgrade":
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
        thinking = False
        request.adjustments.append("thinking=off:reasoning_missing")
    return thinking


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


def to_moonshot_body(request: BackendRequest, hosted_model: str) -> dict:
    body = {key: value for key, value in request.body.items() if key not in HOSTED_STRIPPED}
    for penalty in HOSTED_FIXED_PENALTIES:  # fixed at 0 (§2.1): another value is adjusted, and said so
        if request.body.get(penalty):
            request.adjustments.append(f"{penalty}=0")
    body["model"] = hosted_model
    if not hosted_model.startswith(ALWAYS_THINKING):
        thinking = apply_thinking_rules(body, request)
        body["thinking"] = {"type": "enabled" if thinking else "disabled"}
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
                 vision: bool = True) -> None:
        super().__init__(name, transports, vision=vision)
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._models = dict(models)
        self.available: set[str] | None = None

    def headers(self) -> dict[str, str]:
        return self._headers

    async def start(self) -> None:
        """Check the hosted ids at start: `kimi-k2.5` was retired on 2026-08-31 (§0)."""
        try:
            listing = await self.get_json(self._transports[0], "/v1/models")
            self.available = {card["id"] for card in listing.get("data", [])}
        except (BackendError, ValueError, KeyError, AttributeError):
            return
        for route, hosted in self._models.items():
            if hosted not in self.available:
                log.warning("backend %s: hosted model %r (for route %r) is not offered", self.name, hosted, route)

    def hosted_model(self, route: str) -> str:
        return self._models.get(route, route)

    def check(self, request: BackendRequest) -> None:
        super().check(request)
        if request.adapter is not None:
            raise UnsupportedFeatureError("The hosted API serves no LoRA adapters.", backend=self.name)
        if not request.thinking and self.hosted_model(request.route).startswith(ALWAYS_THINKING):
            raise UnsupportedFeatureError(f"Hosted model '{self.hosted_model(request.route)}' always thinks: "
                                          "instant mode is not available there.", backend=self.name, param="thinking")
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
        return to_moonshot_body(request, self.hosted_model(request.route))

    def error_from(self, status: int, headers: dict[str, str], raw: bytes) -> BackendError:
        return error_from_moonshot(status, headers, raw, self.name)

"""apply_sampling_policy: Kimi's recommended sampling per route profile, and the client's thinking switch.

Pure functions over the request dict: the table tests in tests/unit/policies cover every branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping

from gateway.config import SamplingConfig, SamplingProfile
from gateway.errors import InvalidRequestError

PROFILE_FIELDS = ("temperature", "top_p", "min_p")


@dataclass(frozen=True, slots=True)
class SamplingDecision:
    thinking: bool
    values: Mapping               # fields for the backend to set (self-hosted drivers apply them); read-only
    enforced: bool                # `x-kimi-sampling: enforced` rather than `default`
    overrides: tuple[str, ...]    # fields whose client value the policy replaced (counted in metrics)


def pop_thinking_switch(body: dict) -> bool | None:
    """Remove the client's thinking switch from the body and return it: `thinking: {"type": ...}` (hosted
    form) or `chat_template_kwargs: {"thinking": bool}` (self-hosted form). None when the client is silent."""
    choices: list[bool] = []
    if "thinking" in body:
        switch = body.pop("thinking")
        kind = switch.get("type") if isinstance(switch, dict) else None
        if kind not in ("enabled", "disabled"):
            raise InvalidRequestError('`thinking` must be {"type": "enabled"} or {"type": "disabled"}.', param="thinking")
        choices.append(kind == "enabled")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise InvalidRequestError("`chat_template_kwargs` must be an object.", param="chat_template_kwargs")
        if "thinking" in kwargs:
            value = kwargs["thinking"]
            if not isinstance(value, bool):
                raise InvalidRequestError("`chat_template_kwargs.thinking` must be true or false.",
                                          param="chat_template_kwargs.thinking")
            choices.append(value)
            kwargs = {k: v for k, v in kwargs.items() if k != "thinking"}
            if kwargs:
                body["chat_template_kwargs"] = kwargs
            else:
                del body["chat_template_kwargs"]
    if len(set(choices)) > 1:
        raise InvalidRequestError("`thinking` and `chat_template_kwargs.thinking` disagree.", param="thinking")
    return choices[0] if choices else None


def profile_for(config: SamplingConfig, name: str | None, thinking: bool | None) -> SamplingProfile:
    """The route's profile; a client that switched thinking the other way gets the matching mode's profile
    (Kimi's instant mode is temperature 0.6, not the thinking 1.0)."""
    profile = config.profiles[name or config.default_profile]
    if thinking is None or thinking == profile.thinking:
        return profile
    preferred = "thinking" if thinking else "instant"
    if preferred in config.profiles and config.profiles[preferred].thinking == thinking:
        return config.profiles[preferred]
    matching = [p for p in config.profiles.values() if p.thinking == thinking]
    return matching[0] if matching else profile.model_copy(update={"thinking": thinking})


@lru_cache(maxsize=256)
def profile_values(profile: SamplingProfile) -> MappingProxyType:
    """The values a profile sets, computed once per (frozen) profile and shared read-only."""
    return MappingProxyType({field: getattr(profile, field) for field in PROFILE_FIELDS
                             if getattr(profile, field) is not None})


def apply_sampling_policy(body: dict, config: SamplingConfig, profile_name: str | None) -> SamplingDecision:
    switch = pop_thinking_switch(body)
    profile = profile_for(config, profile_name, switch)
    thinking = profile.thinking if switch is None else switch
    wanted = profile_values(profile)
    if config.mode == "enforce":
        overrides = tuple(f for f, v in wanted.items() if f in body and body[f] != v)
        return SamplingDecision(thinking, wanted, True, overrides)
    values = {f: v for f, v in wanted.items() if f not in body} if any(f in body for f in wanted) else wanted
    return SamplingDecision(thinking, values, False, ())

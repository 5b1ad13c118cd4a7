"""apply_sampling_policy: Kimi's recommended sampling per route profile, and the client's thinking switch.

Pure functions over the request dict: the table tests in tests/unit/policies cover every branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from gateway.config import SamplingConfig, SamplingProfile
from gateway.policies.thinking import pop_reasoning_switch

PROFILE_FIELDS = ("temperature", "top_p", "min_p")


@dataclass(frozen=True, slots=True)
class SamplingDecision:
    thinking: bool
    values: Mapping               # fields for the backend to set (self-hosted drivers apply them); read-only
    enforced: bool                # `x-kimi-sampling: enforced` rather than `default`
    overrides: tuple[str, ...]    # fields whose client value the policy replaced (counted in metrics)
    effort: str | None = None     # the client's reasoning effort, for targets that take one (K3)


def pop_thinking_switch(body: dict) -> bool | None:
    """Remove the client's thinking switch (any generation's form: gateway/policies/thinking.py) and return
    it; None when the client is silent."""
    return pop_reasoning_switch(body)[0]


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


_values: dict[int, tuple[SamplingProfile, MappingProxyType]] = {}      # id(profile) -> (profile, its values)
# (id(config), route profile, client switch) -> (config, profile, thinking, its values, enforce?)
_plans: dict[tuple[int, str | None, bool | None], tuple] = {}
_decisions: dict[tuple[int, bool, str | None], SamplingDecision] = {}  # a default-mode decision without overrides


def profile_values(profile: SamplingProfile) -> MappingProxyType:
    """The values a profile sets, computed once per (frozen) profile and shared read-only. Looked up by the
    profile's identity: hashing a pydantic model hashes all of its fields, per request."""
    entry = _values.get(id(profile))
    if entry is None or entry[0] is not profile:
        if len(_values) >= 256:     # config reloads: profiles that may be gone
            _values.clear()
            _decisions.clear()
        entry = _values[id(profile)] = (profile, MappingProxyType(
            {field: getattr(profile, field) for field in PROFILE_FIELDS if getattr(profile, field) is not None}))
    return entry[1]


def plan(config: SamplingConfig, profile_name: str | None, switch: bool | None) -> tuple:
    """What the policy does for a route's profile and a client's switch, read out of the frozen config once:
    each read of a pydantic model's field costs about 1.5k instructions (its __getattr__ keeps the
    interpreter from caching attribute lookups), several per request."""
    entry = _plans.get((id(config), profile_name, switch))
    if entry is not None and entry[0] is config:
        return entry
    profile = profile_for(config, profile_name, switch)
    if len(_plans) >= 256:          # config reloads: configs that may be gone
        _plans.clear()
    entry = _plans[(id(config), profile_name, switch)] = (
        config, profile, profile.thinking if switch is None else switch, profile_values(profile), config.mode == "enforce")
    return entry


def apply_sampling_policy(body: dict, config: SamplingConfig, profile_name: str | None) -> SamplingDecision:
    switch, effort = pop_reasoning_switch(body)
    _, profile, thinking, wanted, enforce = plan(config, profile_name, switch)
    if enforce:
        overrides = tuple(f for f, v in wanted.items() if f in body and body[f] != v)
        return SamplingDecision(thinking, wanted, True, overrides, effort)
    if not wanted.keys().isdisjoint(body):
        return SamplingDecision(thinking, {f: v for f, v in wanted.items() if f not in body}, False, (), effort)
    # The common case (the client set none of the profile's fields): one shared decision per profile and mode.
    key = (id(profile), thinking, effort)
    decision = _decisions.get(key)
    if decision is None or decision.values is not wanted:
        decision = _decisions[key] = SamplingDecision(thinking, wanted, False, (), effort)
    return decision

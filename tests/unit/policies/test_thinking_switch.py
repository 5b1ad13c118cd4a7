"""The client's thinking switch in every generation's form (gateway/policies/thinking.py), table-tested."""
from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from gateway.policies.thinking import pop_reasoning_switch


@pytest.mark.parametrize("body, switch, rest", [
    ({}, (None, None), {}),
    ({"thinking": {"type": "enabled"}}, (True, None), {}),
    ({"thinking": {"type": "enabled", "keep": "all"}}, (True, None), {}),
    ({"thinking": {"type": "disabled"}}, (False, None), {}),
    ({"chat_template_kwargs": {"thinking": False, "x": 1}}, (False, None), {"chat_template_kwargs": {"x": 1}}),
    ({"chat_template_kwargs": {"enable_thinking": False}}, (False, None), {}),
    ({"chat_template_kwargs": {"preserve_thinking": True}}, (None, None), {}),
    ({"chat_template_kwargs": {"x": 1}}, (None, None), {"chat_template_kwargs": {"x": 1}}),
    ({"reasoning_effort": "high"}, (True, "high"), {}),
    ({"reasoning_effort": "none"}, (False, None), {}),
    ({"reasoning_effort": None}, (None, None), {}),
    ({"reasoning": {"enabled": False}}, (False, None), {}),
    ({"reasoning": {"effort": "low"}}, (True, "low"), {}),
    ({"thinking": {"type": "enabled"}, "reasoning_effort": "max", "chat_template_kwargs": {"thinking": True}},
     (True, "max"), {}),
])
def test_forms(body, switch, rest):
    assert pop_reasoning_switch(body) == switch
    assert body == rest


@pytest.mark.parametrize("body, param", [
    ({"thinking": {"type": "enabled", "keep": "some"}}, "thinking"),
    ({"thinking": {"type": "enabled", "budget": 3}}, "thinking"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning": {"enabled": "yes"}}, "reasoning.enabled"),
    ({"reasoning": {"mode": 1}}, "reasoning"),
    ({"reasoning": {"effort": "low"}, "reasoning_effort": "high"}, "reasoning_effort"),
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, "thinking"),
    ({"chat_template_kwargs": {"thinking": True, "enable_thinking": False}}, "thinking"),
])
def test_malformed_or_disagreeing_switches_are_a_400(body, param):
    with pytest.raises(InvalidRequestError) as failure:
        pop_reasoning_switch(body)
    assert failure.value.param == param

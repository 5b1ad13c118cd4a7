"""The sampling policy, table-tested: Kimi's recommended values per profile, mode, and thinking switch."""
import pytest

from gateway.config import SamplingConfig
from gateway.errors import InvalidRequestError
from gateway.policies.sampling import apply_sampling_policy

DEFAULT = SamplingConfig()
ENFORCE = SamplingConfig(mode="enforce")


@pytest.mark.parametrize("config, profile, body, thinking, values, overrides", [
    # nothing sent: the thinking profile fills everything
    (DEFAULT, None, {}, True, {"temperature": 1.0, "top_p": 0.95, "min_p": 0.01}, ()),
    # an instant route
    (DEFAULT, "instant", {}, False, {"temperature": 0.6, "top_p": 0.95, "min_p": 0.01}, ()),
    # default mode keeps what the client sent
    (DEFAULT, None, {"temperature": 0.2}, True, {"top_p": 0.95, "min_p": 0.01}, ()),
    # enforce mode overrides, and says which it changed
    (ENFORCE, None, {"temperature": 0.2, "top_p": 0.95}, True,
     {"temperature": 1.0, "top_p": 0.95, "min_p": 0.01}, ("temperature",)),
    # the client turns thinking off (self-hosted form): instant values follow
    (DEFAULT, None, {"chat_template_kwargs": {"thinking": False}}, False,
     {"temperature": 0.6, "top_p": 0.95, "min_p": 0.01}, ()),
    # ... or in the hosted form
    (DEFAULT, None, {"thinking": {"type": "disabled"}}, False, {"temperature": 0.6, "top_p": 0.95, "min_p": 0.01}, ()),
    # an instant route where the client asks for thinking
    (DEFAULT, "instant", {"thinking": {"type": "enabled"}}, True, {"temperature": 1.0, "top_p": 0.95, "min_p": 0.01}, ()),
])
def test_policy(config, profile, body, thinking, values, overrides):
    decision = apply_sampling_policy(body, config, profile)
    assert decision.thinking is thinking
    assert decision.values == values
    assert decision.overrides == overrides
    assert decision.enforced is (config.mode == "enforce")


def test_switches_leave_the_body_and_other_kwargs_stay():
    body = {"thinking": {"type": "disabled"}, "chat_template_kwargs": {"thinking": False, "foo": 1}}
    apply_sampling_policy(body, DEFAULT, None)
    assert body == {"chat_template_kwargs": {"foo": 1}}


@pytest.mark.parametrize("body, param", [
    ({"thinking": True}, "thinking"),
    ({"thinking": {"type": "maybe"}}, "thinking"),
    ({"chat_template_kwargs": {"thinking": "no"}}, "chat_template_kwargs.thinking"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": False}}, "thinking"),
])
def test_bad_switches_are_400(body, param):
    with pytest.raises(InvalidRequestError) as failure:
        apply_sampling_policy(body, DEFAULT, None)
    assert failure.value.param == param

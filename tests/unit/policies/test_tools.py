"""check_agent_fields(): whatever a client puts in the agent fields, a 400 or a pass; never another exception."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequestError
from gateway.policies.tools import check_agent_fields

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(
    ["function", "auto", "json_schema", "json_object", "text"]), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["type", "function", "name", "json_schema", "schema", "x"]), inner, max_size=3),
    max_leaves=10)
RESPONSE_FORMAT = st.fixed_dictionaries({"type": st.sampled_from(["json_schema", "json_object", "text"]) | JSON},
                                        optional={"json_schema": JSON | st.fixed_dictionaries({}, optional={
                                            "schema": JSON})})
TOOL_CHOICE = st.fixed_dictionaries({"type": JSON}, optional={"function": JSON})


@given(st.fixed_dictionaries({}, optional={"tools": JSON, "tool_choice": JSON | TOOL_CHOICE,
                                           "response_format": JSON | RESPONSE_FORMAT,
                                           "parallel_tool_calls": JSON, "functions": JSON}))
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_agent_fields_pass_or_are_a_400(fields):
    try:
        check_agent_fields(fields)
    except InvalidRequestError:
        pass


@pytest.mark.parametrize("fields, fragment", [
    ({"tool_choice": {"type": "function", "function": "get_weather"}}, "'tool_choice' must be"),
    ({"response_format": {"type": "json_schema", "json_schema": "trip"}}, "'response_format.json_schema' must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 7}}}, "must be a JSON schema object"),
])
def test_malformed_agent_fields_are_named(fields, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        check_agent_fields(fields)

"""forwarded_request(): the data plane's BackendRequest, built without the dataclass's keyword call."""
from __future__ import annotations

import dataclasses

from backends.base import AgentRules, BackendRequest, forwarded_request


def test_forwarded_request_sets_every_field_as_the_dataclass_does():
    given = dict(sampling={"temperature": 0.6}, stream=True, has_images=True, request_id="r-1",
                 rules=AgentRules(strip_reasoning=True), hide_usage_chunk=True, observer=object(), effort="high",
                 traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01", tenant="team", priority=0, deadline=12.5)
    built = forwarded_request("/v1/chat/completions", {"model": "m"}, "m", "route", "a@1", True, **given)
    expected = BackendRequest("/v1/chat/completions", {"model": "m"}, "m", "route", "a@1", True, **given)
    for field in dataclasses.fields(BackendRequest):   # a field the factory forgot is unset: AttributeError
        assert getattr(built, field.name) == getattr(expected, field.name), field.name
    assert built == expected
    # the per-request lists are the request's own
    other = forwarded_request("/v1/chat/completions", {}, "m", "route", None, False, **given)
    assert built.adjustments is not other.adjustments and built.avoid is not other.avoid

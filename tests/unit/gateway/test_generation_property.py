"""Property: whatever thinking switch a client sends, in whichever generation's form, no request the gateway
writes carries both `thinking` and `reasoning_effort` (the hosted API answers 400: moonshot-api.md §8), and
every hosted body is accepted by the emulator of its target's generation unless the route forwards missing
reasoning on purpose."""
from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import AgentRules, BackendRequest
from backends.errors import BackendRejectedError
from backends.generations import EFFORTS, GENERATIONS, generation, normalise_history
from backends.hosted import to_moonshot_body
from backends.hosted_models import HostedCatalog
from backends.llamacpp import to_llamacpp_body
from backends.sglang import to_sglang_body
from gateway.config import SamplingConfig
from gateway.errors import InvalidRequestError
from gateway.policies.sampling import apply_sampling_policy
from tests.emulators.moonshot_rules import HostedError, check_chat_request

HOSTED = ("kimi-k2.5", "kimi-k2.6", "kimi-k2.7-code", "kimi-k3")
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = [{"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]

absent = st.just(None)
thinking_forms = st.one_of(absent, st.sampled_from([{"type": "enabled"}, {"type": "disabled"},
                                                    {"type": "enabled", "keep": "all"}]))
template_forms = st.one_of(absent, st.fixed_dictionaries({}, optional={
    "thinking": st.booleans(), "enable_thinking": st.booleans(), "preserve_thinking": st.booleans()}))
efforts = st.one_of(absent, st.sampled_from(sorted(EFFORTS)))
reasoning_objects = st.one_of(absent, st.fixed_dictionaries({}, optional={
    "enabled": st.booleans(), "effort": st.sampled_from(sorted(EFFORTS))}))
tool_choices = st.one_of(absent, st.sampled_from(["auto", "none", "required",
                                                  {"type": "function", "function": {"name": "get_weather"}}]))
reasoning_values = st.one_of(absent, st.sampled_from(["", "thought"]))
turns = st.lists(st.tuples(reasoning_values, st.sampled_from(["reasoning_content", "reasoning"])), max_size=3)
rules = st.builds(AgentRules, forced_tool_choice=st.sampled_from(["downgrade", "instant", "reject"]),
                  missing_reasoning=st.sampled_from(["instant", "reject", "forward", "placeholder"]))


def client_body(thinking, template, effort, reasoning, tool_choice, history) -> dict:
    body: dict = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 64}
    for value, name in history:
        turn = {"role": "assistant", "content": None, "tool_calls": CALL}
        if value is not None:
            turn[name] = value
        body["messages"] += [turn, {"role": "tool", "tool_call_id": CALL[0]["id"], "content": "21"}]
    for key, value in (("thinking", thinking), ("chat_template_kwargs", template), ("reasoning_effort", effort),
                       ("reasoning", reasoning), ("tool_choice", tool_choice)):
        if value is not None:
            body[key] = value
    if tool_choice is not None or history:
        body["tools"] = [TOOL]
    return body


@settings(max_examples=300, deadline=None)
@given(thinking_forms, template_forms, efforts, reasoning_objects, tool_choices, turns, rules)
def test_never_thinking_and_reasoning_effort_together(thinking, template, effort, reasoning, tool_choice, history,
                                                      route_rules):
    body = client_body(thinking, template, effort, reasoning, tool_choice, history)
    try:
        decision = apply_sampling_policy(body, SamplingConfig(), None)
    except InvalidRequestError:
        return  # disagreeing or malformed switches: the client gets a 400, nothing is sent
    normalise_history(body["messages"])
    for model in HOSTED:
        gen = HostedCatalog("h", {}).generation_of(model)
        if gen.always_thinks and not decision.thinking:
            continue  # the driver's check() refuses instant mode there before any body is written
        request = BackendRequest(path="/v1/chat/completions", body=copy.deepcopy(body), model="kimi-k2.5",
                                 route=model, adapter=None, thinking=decision.thinking, effort=decision.effort,
                                 rules=route_rules)
        try:
            sent = to_moonshot_body(request, model, gen)
        except BackendRejectedError as exc:
            assert "route rule: reject" in exc.message
            continue
        assert not ("thinking" in sent and "reasoning_effort" in sent), sent
        if route_rules.missing_reasoning != "forward":
            try:
                check_chat_request(sent, HOSTED)
            except HostedError as exc:
                raise AssertionError(f"{model}: the emulator refused what the gateway wrote: {exc.message}") from exc
    for name in GENERATIONS:
        request = BackendRequest(path="/v1/chat/completions", body=copy.deepcopy(body), model="kimi-k2.5",
                                 route="kimi-k2.5", adapter=None, thinking=decision.thinking, effort=decision.effort,
                                 sampling=decision.values)
        for sent in (to_sglang_body(request, "kimi", generation(name)),
                     to_llamacpp_body(request, [], None, generation(name))):
            assert not ("thinking" in sent and "reasoning_effort" in sent), sent
            assert "reasoning" not in sent

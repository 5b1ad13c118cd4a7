"""Agent traffic on the real llama-server: the Kimi-template reasoning split, structured output under both
templates, and a real tool call parsed by llama-server's Kimi K2 handler (llamacpp.md §9)."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings

from tests.integration.conftest import sdk
from tests.unit.backends.test_json_grammar_fuzz import schemas

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]
OFF = {"chat_template_kwargs": {"thinking": False}}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def gateways(kimi_llama, llama_server, start_gateway) -> dict[str, str]:
    config = {"backends": [{"name": "kimi-tpl", "kind": "llamacpp", "url": kimi_llama},
                           {"name": "chatml", "kind": "llamacpp", "url": llama_server}],
              "routes": [{"name": "kimi-k2.5", "targets": ["kimi-tpl"]}, {"name": "chatml", "targets": ["chatml"]}]}
    url = start_gateway(config, name="gateway-llama-agents")
    return {"kimi": url}


def complete(client, stream: bool, **extra) -> tuple[str, str]:
    """(reasoning, content) of one greedy answer, whole or streamed."""
    kwargs = dict(model="kimi-k2.5", messages=PROMPT, max_tokens=12, temperature=0, **extra)
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0].message
        return getattr(message, "reasoning_content", None) or "", message.content or ""
    reasoning, content = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("stream", [False, True])
def test_kimi_template_reasoning_split(gateways, stream):
    client = sdk(gateways["kimi"])
    reasoning, content = complete(client, stream)
    assert reasoning and not content.strip()
    for switch in (OFF, {"thinking": {"type": "disabled"}}):
        reasoning_off, content_off = complete(client, stream, extra_body=switch)
        assert content_off and not reasoning_off


def test_kimi_template_stream_equals_non_stream(gateways):
    client = sdk(gateways["kimi"])
    assert complete(client, True) == complete(client, False)
    assert complete(client, True, extra_body=OFF) == complete(client, False, extra_body=OFF)


def test_structured_output_is_enforced_under_chatml(gateways):
    response = sdk(gateways["kimi"]).chat.completions.create(
        model="chatml", messages=PROMPT, max_tokens=256, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    doc = json.loads(response.choices[0].message.content)
    assert set(doc) == {"city", "days"} and isinstance(doc["city"], str) and isinstance(doc["days"], int)


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_under_the_kimi_template_goes_as_a_grammar(gateways, stream):
    """This build ignores response_format under the Kimi handler; the gateway sends a grammar instead."""
    kwargs = dict(model="kimi-k2.5", messages=PROMPT, max_tokens=256, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    client = sdk(gateways["kimi"])
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        assert raw.headers["x-kimi-adjusted"] == "thinking=off:structured_output"
        text = raw.parse().choices[0].message.content
    doc = json.loads(text)
    assert set(doc) == {"city", "days"} and isinstance(doc["city"], str) and isinstance(doc["days"], int)


def test_structured_output_with_no_grammar_form_is_refused_not_faked(gateways):
    with pytest.raises(openai.BadRequestError, match="has no grammar form"):
        sdk(gateways["kimi"]).chat.completions.create(
            model="kimi-k2.5", messages=PROMPT, max_tokens=16, response_format={
                "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "^a+$"}}})


def test_real_tool_call_parsed_by_llama_server(gateways, kimi_llama):
    """A random model never reaches the call marker by itself; a logit bias on <|tool_call_begin|> (a single
    token in the tiny vocabulary) makes it, and llama-server's Kimi handler parses the call."""
    marker = httpx.post(f"{kimi_llama}/tokenize", json={"content": "<|tool_call_begin|>", "parse_special": True},
                        timeout=10).json()["tokens"]
    assert len(marker) == 1
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
    kwargs = dict(model="kimi-k2.5", messages=[{"role": "user", "content": "weather in Paris"}], tools=tools,
                  max_tokens=512, temperature=0, parallel_tool_calls=False,
                  logit_bias={str(marker[0]): 100}, extra_body=OFF)
    client = sdk(gateways["kimi"])
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    streamed = "".join(d.function.arguments or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       for ch in c.choices for d in (ch.delta.tool_calls or ()) if d.function)
    assert json.loads(streamed) == json.loads(call.function.arguments)


def test_two_turn_tool_loop_through_llama_server(gateways, kimi_llama):
    """Turn one calls the tool (forced as above); turn two sends the result back, the reasoning dropped."""
    marker = httpx.post(f"{kimi_llama}/tokenize", json={"content": "<|tool_call_begin|>", "parse_special": True},
                        timeout=10).json()["tokens"][0]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]
    ask = [{"role": "user", "content": "weather in Paris"}]
    client = sdk(gateways["kimi"])
    first = client.chat.completions.create(model="kimi-k2.5", messages=ask, tools=tools, max_tokens=512,
                                           temperature=0, parallel_tool_calls=False,
                                           logit_bias={str(marker): 100}, extra_body=OFF).choices[0].message
    call = first.tool_calls[0]
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    second = client.chat.completions.create(model="kimi-k2.5", messages=history, tools=tools, max_tokens=8,
                                            temperature=0).choices[0]
    assert second.finish_reason == "length" and getattr(second.message, "reasoning_content", None)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"when": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                      "ok": {"type": "boolean"}, "kind": {"const": "trip"}}},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "score": {"type": "number"}}}}},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
])
def test_grammar_forms_of_schemas_hold_on_the_real_server(gateways, schema):
    response = sdk(gateways["kimi"]).chat.completions.create(
        model="kimi-k2.5", messages=PROMPT, max_tokens=300, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def nested_arrays(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


@pytest.mark.parametrize("response_format, fragment", [
    ({"type": "json_schema", "json_schema": "trip"}, "'response_format.json_schema' must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": 7}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": nested_arrays(400)}}, "nested more than 64"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": list(range(5000))}}},
     "more than 1024 alternatives"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": "abc"}}}, "must be a non-empty array"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "minLength": 10**9}}},
     "'minLength' (at 'root') must be an integer from 0 to 2000"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#"}}}, "'$ref'"),
    ({"type": "xml"}, "'response_format.type' must be one of"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {"a": False}}}},
     "schema false (at 'a') matches nothing"),
])
def test_schemas_with_no_grammar_form_are_a_400_never_a_500(gateways, response_format, fragment):
    response = httpx.post(f"{gateways['kimi']}/chat/completions", timeout=60, json={
        "model": "kimi-k2.5", "messages": PROMPT, "max_tokens": 4, "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == "response_format"


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"é²": {"type": "string", "maxLength": 3}, "🦙 name": {"enum": [1, 2]}}},
    nested_arrays(60),
    {"enum": [{"a": [1, None]}, "\u202e\n\"", 2**70]},
])
def test_edge_schemas_become_grammars_the_server_takes(gateways, schema):
    """Rule names are ASCII whatever the property names; deep and odd-valued schemas are still real grammars."""
    response = httpx.post(f"{gateways['kimi']}/chat/completions", timeout=60, json={
        "model": "kimi-k2.5", "messages": PROMPT, "max_tokens": 400, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), schema)


@given(schema=schemas())
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_schemas_through_the_gateway(gateways, schema):
    response = httpx.post(f"{gateways['kimi']}/chat/completions", timeout=60, json={
        "model": "kimi-k2.5", "messages": PROMPT, "max_tokens": 4, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}

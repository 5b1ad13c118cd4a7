"""The Moonshot emulator: auth, models, hosted request rules, response and stream shapes, faults
(moonshot-api.md §0-§4)."""

from __future__ import annotations

import json

import pytest

from tests.emulators.moonshot import MoonshotOptions, create_moonshot_app
from tests.unit.emulators.helpers import WEATHER_TOOL, client_for, sse_payloads, user

KEY = {"Authorization": "Bearer test-key"}
OPTIONS = MoonshotOptions(api_key="test-key")
OFF = {"type": "disabled"}


async def chat(body: dict, options: MoonshotOptions = OPTIONS, headers: dict | None = None):
    async with client_for(create_moonshot_app(options)) as client:
        return await client.post("/v1/chat/completions", json=body, headers=KEY if headers is None else headers)


def request(**fields) -> dict:
    return {"model": "kimi-k2.6", "messages": user("hello"), **fields}


def assert_hosted_error(response, status: int, error_type: str, message: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == error_type
    if message is not None:
        assert body["error"]["message"] == message


# --- auth and models -----------------------------------------------------------------------------


async def test_missing_key_is_incorrect_api_key_error():
    assert_hosted_error(await chat(request(), headers={}), 401, "incorrect_api_key_error",
                        "Incorrect API key provided")


async def test_wrong_key_is_invalid_authentication_error():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        response = await client.get("/v1/models", headers={"Authorization": "Bearer other"})
    assert_hosted_error(response, 401, "invalid_authentication_error", "Invalid Authentication")


async def test_without_a_configured_key_any_bearer_key_works():
    assert (await chat(request(), MoonshotOptions(), {"Authorization": "Bearer anything"})).status_code == 200


async def test_models_default_to_k2_6_and_k3():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        body = (await client.get("/v1/models", headers=KEY)).json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["kimi-k2.6", "kimi-k3"]


async def test_retired_k2_5_is_not_found():
    assert_hosted_error(await chat(request(model="kimi-k2.5")), 404, "resource_not_found_error",
                        "Not found the model kimi-k2.5 or Permission denied")


async def test_configured_models_replace_the_defaults():
    options = MoonshotOptions(api_key="test-key", models=("kimi-k2.5",))
    assert (await chat(request(model="kimi-k2.5"), options)).status_code == 200
    assert (await chat(request(), options)).status_code == 404


# --- fixed sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"temperature": 0.7}, "invalid temperature: only 1 is allowed for this model"),
    ({"temperature": 0.6}, "invalid temperature: only 1 is allowed for this model"),
    ({"temperature": 1.0, "thinking": OFF}, "invalid temperature: only 0.6 is allowed for this model"),
    ({"top_p": 0.9}, "invalid top_p: only 0.95 is allowed for this model"),
    ({"n": 2}, "invalid n: only 1 is allowed for this model"),
    ({"presence_penalty": 0.5}, "invalid presence_penalty: only 0 is allowed for this model"),
    ({"frequency_penalty": 0.1}, "invalid frequency_penalty: only 0 is allowed for this model"),
])
async def test_non_fixed_sampling_values_are_hard_400s(fields, message):
    assert_hosted_error(await chat(request(**fields)), 400, "invalid_request_error", message)


@pytest.mark.parametrize("fields", [
    {"temperature": 1.0}, {"temperature": 1}, {"temperature": 0.6, "thinking": OFF}, {"top_p": 0.95}, {"n": 1},
    {"presence_penalty": 0, "frequency_penalty": 0.0}, {"thinking": {"type": "enabled"}, "temperature": 1.0},
])
async def test_fixed_values_or_absent_fields_are_accepted(fields):
    assert (await chat(request(**fields))).status_code == 200


@pytest.mark.parametrize("temperature", [1.5, -0.1, "1"])
async def test_temperature_outside_zero_to_one_is_rejected(temperature):
    assert_hosted_error(await chat(request(temperature=temperature)), 400, "invalid_request_error")


# --- fields and thinking -------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("chat_template_kwargs", {"thinking": False}), ("min_p", 0.01), ("top_k", 40), ("lora_path", "neko"),
    ("separate_reasoning", True), ("repetition_penalty", 1.0),
])
async def test_self_hosted_fields_are_rejected_as_unknown(field, value):
    assert_hosted_error(await chat(request(**{field: value})), 400, "invalid_request_error",
                        f"Invalid request: unknown field {field}")


async def test_legacy_functions_field_is_rejected():
    response = await chat(request(functions=[WEATHER_TOOL["function"]]))
    assert_hosted_error(response, 400, "invalid_request_error")
    assert "functions" in response.json()["error"]["message"]


@pytest.mark.parametrize("thinking", [{"type": "auto"}, {"type": True}, "enabled", {"type": "enabled", "budget": 5}])
async def test_invalid_thinking_values_are_rejected(thinking):
    assert_hosted_error(await chat(request(thinking=thinking)), 400, "invalid_request_error")


async def test_keep_all_is_accepted_on_k2_6_but_not_k2_5():
    keep = {"type": "enabled", "keep": "all"}
    assert (await chat(request(thinking=keep))).status_code == 200
    options = MoonshotOptions(api_key="test-key", models=("kimi-k2.5",))
    assert (await chat(request(model="kimi-k2.5", thinking=keep), options)).status_code == 400


async def test_k3_rejects_thinking_and_accepts_reasoning_effort():
    assert (await chat(request(model="kimi-k3", thinking=OFF))).status_code == 400
    assert (await chat(request(model="kimi-k3", reasoning_effort="high"))).status_code == 200
    assert (await chat(request(reasoning_effort="high"))).status_code == 400


# --- tools ---------------------------------------------------------------------------------------


async def test_required_tool_choice_is_rejected_while_thinking():
    assert_hosted_error(await chat(request(tools=[WEATHER_TOOL], tool_choice="required")), 400,
                        "invalid_request_error")


async def test_named_tool_choice_is_rejected_while_thinking():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    assert_hosted_error(await chat(request(tools=[WEATHER_TOOL], tool_choice=choice)), 400,
                        "invalid_request_error", "tool_choice 'specified' is incompatible with thinking enabled")


async def test_named_tool_choice_with_thinking_off_calls_the_tool():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = (await chat(request(tools=[WEATHER_TOOL], tool_choice=choice, thinking=OFF))).json()
    choice_out = body["choices"][0]
    assert choice_out["finish_reason"] == "tool_calls"
    (call,) = choice_out["message"]["tool_calls"]
    assert call["id"] == "functions.get_weather:0" and call["type"] == "function"
    assert set(json.loads(call["function"]["arguments"])) == {"city", "days"}
    assert "reasoning_content" not in choice_out["message"]


async def test_mentioned_tool_is_called_while_thinking_with_reasoning():
    body = (await chat(request(messages=user("call get_weather"), tools=[WEATHER_TOOL]))).json()
    message = body["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert message["reasoning_content"]


async def test_at_most_128_tools():
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {}}} for i in range(129)]
    assert_hosted_error(await chat(request(tools=tools)), 400, "invalid_request_error")
    assert (await chat(request(tools=tools[:128]))).status_code == 200


@pytest.mark.parametrize("name, ok", [("get_weather", True), ("_x-1", True), ("a" * 64, True), ("a" * 65, False),
                                      ("1abc", False), ("get.weather", False), ("", False)])
async def test_function_name_pattern(name, ok):
    tools = [{"type": "function", "function": {"name": name, "parameters": {}}}]
    assert ((await chat(request(tools=tools))).status_code == 200) is ok


# --- history and media ---------------------------------------------------------------------------


def tool_history(reasoning: str | None) -> list[dict]:
    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}, assistant,
            {"role": "tool", "tool_call_id": "get_weather:0", "content": "sunny"}]


@pytest.mark.parametrize("reasoning", [None, ""])
async def test_tool_call_history_without_reasoning_content_is_rejected_while_thinking(reasoning):
    response = await chat(request(messages=tool_history(reasoning), tools=[WEATHER_TOOL]))
    assert_hosted_error(response, 400, "invalid_request_error",
                        "thinking is enabled but reasoning_content is missing in assistant tool call message at index 2")


@pytest.mark.parametrize("reasoning, thinking", [("I should look it up", None), (" ", None), (None, OFF)])
async def test_tool_call_history_is_accepted_with_reasoning_or_without_thinking(reasoning, thinking):
    fields = {"thinking": thinking} if thinking else {}
    response = await chat(request(messages=tool_history(reasoning), tools=[WEATHER_TOOL], **fields))
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "tool_calls")


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://example.com/cat.png", "file:///tmp/cat.png"])
async def test_remote_image_urls_are_unsupported(url):
    assert_hosted_error(await chat(request(messages=image_message(url))), 400, "invalid_request_error",
                        "unsupported image url")


@pytest.mark.parametrize("url", ["data:image/png;base64,iVBORw0KGgo=", "ms://file-abc123"])
async def test_inline_and_uploaded_images_are_accepted(url):
    assert (await chat(request(messages=image_message(url)))).status_code == 200


@pytest.mark.parametrize("stop, ok", [(["a"] * 5, True), (["a"] * 6, False), (["x" * 33], False), ("end", True)])
async def test_stop_limits(stop, ok):
    assert ((await chat(request(stop=stop))).status_code == 200) is ok


async def test_prompt_plus_max_tokens_over_the_context_is_rejected():
    assert_hosted_error(await chat(request(max_tokens=262144)), 400, "invalid_request_error",
                        "Your request exceeded model token limit : 262144")


async def test_malformed_json_is_invalid_request():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        response = await client.post("/v1/chat/completions", content=b"{oops", headers=KEY)
    assert_hosted_error(response, 400, "invalid_request_error")


# --- responses -----------------------------------------------------------------------------------


async def test_non_stream_response_shape_and_flat_cached_tokens():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        first = (await client.post("/v1/chat/completions", json=request(), headers=KEY)).json()
        second = (await client.post("/v1/chat/completions", json=request(), headers=KEY)).json()
    assert first["object"] == "chat.completion" and first["model"] == "kimi-k2.6"
    message = first["choices"][0]["message"]
    assert message["role"] == "assistant" and message["reasoning_content"] and message["content"]
    assert set(first["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"}
    assert first["usage"]["cached_tokens"] == 0
    assert second["usage"]["cached_tokens"] == second["usage"]["prompt_tokens"] > 0
    assert second["choices"][0]["message"] == message


async def test_thinking_disabled_has_no_reasoning_content():
    body = (await chat(request(thinking=OFF))).json()
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert len(body["choices"][0]["message"]["content"].split()) == 16


async def test_max_tokens_bounds_reasoning_plus_content():
    body = (await chat(request(max_tokens=6))).json()
    message = body["choices"][0]["message"]
    assert len(message["reasoning_content"].split()) + len(message["content"].split()) == 6
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6


async def test_json_schema_response_format():
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "n": {"type": "number"}},
              "required": ["title", "n"]}
    body = (await chat(request(response_format={"type": "json_schema",
                                                "json_schema": {"name": "t", "schema": schema}}))).json()
    assert set(json.loads(body["choices"][0]["message"]["content"])) == {"title", "n"}


async def test_stream_reasoning_before_content_and_usage_in_final_choice():
    response = await chat(request(stream=True, max_tokens=8))
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    first, *deltas, final, _ = payloads
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    kinds = [next(iter(d["choices"][0]["delta"])) for d in deltas]
    assert kinds == ["reasoning_content"] * 4 + ["content"] * 4
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert final["choices"][0]["usage"]["completion_tokens"] == 8
    assert "usage" not in final


async def test_stream_include_usage_adds_openai_usage_chunk():
    payloads = sse_payloads((await chat(request(stream=True, stream_options={"include_usage": True}))).text)
    final, usage_chunk, done = payloads[-3:]
    assert done == "[DONE]"
    assert final["choices"][0]["usage"] == usage_chunk["usage"]
    assert usage_chunk["choices"] == []


async def test_streamed_tool_call_deltas():
    payloads = sse_payloads((await chat(request(messages=user("call get_weather"), tools=[WEATHER_TOOL],
                                                stream=True))).text)
    tool_deltas = [p["choices"][0]["delta"]["tool_calls"][0] for p in payloads[:-1]
                   if "tool_calls" in p["choices"][0]["delta"]]
    assert tool_deltas[0]["id"] == "functions.get_weather:0" and tool_deltas[0]["function"]["arguments"] == ""
    json.loads("".join(d["function"]["arguments"] for d in tool_deltas[1:]))
    assert payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_estimate_token_count():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        response = await client.post("/v1/tokenizers/estimate-token-count",
                                     json={"model": "kimi-k2.6", "messages": user("one two three")}, headers=KEY)
    assert response.status_code == 200 and response.json()["data"]["total_tokens"] > 3


# --- faults and the request log ------------------------------------------------------------------


async def test_429_fault_is_engine_overloaded_with_retry_after():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/_emulator/faults", json={"status": 429})
        response = await client.post("/v1/chat/completions", json=request(), headers=KEY)
        after = await client.post("/v1/chat/completions", json=request(), headers=KEY)
    assert_hosted_error(response, 429, "engine_overloaded_error",
                        "The engine is currently overloaded, please try again later")
    assert response.headers["retry-after"] == "1"
    assert after.status_code == 200


async def test_rate_limit_fault_type_has_no_retry_after():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/_emulator/faults", json={"status": 429, "type": "rate_limit_reached_error"})
        response = await client.post("/v1/chat/completions", json=request(), headers=KEY)
    assert_hosted_error(response, 429, "rate_limit_reached_error")
    assert "retry-after" not in response.headers


async def test_504_fault_is_an_html_page():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/_emulator/faults", json={"status": 504})
        response = await client.post("/v1/chat/completions", json=request(), headers=KEY)
    assert response.status_code == 504 and response.headers["content-type"].startswith("text/html")


async def test_stream_error_fault_sends_hosted_error_event():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/_emulator/faults", json={"stream_error_after": 1})
        response = await client.post("/v1/chat/completions", json=request(stream=True), headers=KEY)
    payloads = sse_payloads(response.text)
    assert response.status_code == 200 and len(payloads) == 3
    assert payloads[1]["error"]["type"] == "server_error" and payloads[2] == "[DONE]"


async def test_delay_fault_uses_the_injected_sleep():
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    options = MoonshotOptions(api_key="test-key", sleep=fake_sleep)
    async with client_for(create_moonshot_app(options)) as client:
        await client.post("/_emulator/faults", json={"delay_first_byte_s": 1.5, "count": 2})
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=request(), headers=KEY)).status_code == 200
    assert slept == [1.5, 1.5]


async def test_request_log_keeps_rejected_bodies_and_reset_clears_it():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/v1/chat/completions", json=request(min_p=0.01), headers=KEY)
        log = (await client.get("/_emulator/requests")).json()
        await client.post("/_emulator/reset")
        assert (await client.get("/_emulator/requests")).json() == []
    assert log[0]["body"]["min_p"] == 0.01 and log[0]["has_authorization"] is True


async def test_requests_rejected_by_auth_are_logged_without_authorization():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/v1/chat/completions", json=request())
        log = (await client.get("/_emulator/requests")).json()
    assert len(log) == 1 and log[0]["has_authorization"] is False and log[0]["body"]["model"] == "kimi-k2.6"


# --- timing and raw bodies -----------------------------------------------------------------------


async def test_prefill_fault_holds_the_first_event_not_the_head():
    log: list = []

    async def sleep(seconds: float) -> None:
        log.append(("sleep", seconds))
    app = create_moonshot_app(MoonshotOptions(api_key="test-key", sleep=sleep))
    async with client_for(app) as client:
        await client.post("/_emulator/faults", json={"delay_prefill_s": 4.0})
        async with client.stream("POST", "/v1/chat/completions", json=request(stream=True), headers=KEY) as response:
            assert response.status_code == 200
            text = (await response.aread()).decode()
    assert log == [("sleep", 4.0)] and text.endswith("data: [DONE]\n\n")


async def test_raw_body_fault_is_a_proxy_page():
    async with client_for(create_moonshot_app(OPTIONS)) as client:
        await client.post("/_emulator/faults", json={"raw_body": "<html>bad gateway</html>", "status": 502})
        response = await client.post("/v1/chat/completions", json=request(), headers=KEY)
    assert response.status_code == 502 and response.text == "<html>bad gateway</html>"

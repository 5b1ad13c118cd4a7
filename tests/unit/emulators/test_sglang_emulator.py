"""The SGLang emulator's OpenAI endpoints, errors, auth, health, metrics and faults (sglang-kt.md §2, §4).

LoRA load/unload, adapter selection and static KT mode are in test_sglang_lora_emulator.py.
"""

from __future__ import annotations

import json

import pytest

from tests.emulators.common import EmulatedDisconnect, Fault, faulty_events
from tests.emulators.generation import EOS_TOKEN_ID
from tests.emulators.sglang import SglangOptions, create_sglang_app
from tests.unit.emulators.helpers import WEATHER_TOOL, client_for, sse_payloads, user

KIMI = SglangOptions(reasoning_parser="kimi_k2", tool_call_parser="kimi_k2")


async def chat(options: SglangOptions, body: dict, **kwargs):
    async with client_for(create_sglang_app(options)) as client:
        return await client.post("/v1/chat/completions", json=body, **kwargs)


# --- non-stream chat -----------------------------------------------------------------------------


async def test_chat_response_has_sglang_shape_and_echoes_model():
    response = await chat(KIMI, {"model": "whatever-name", "messages": user("hello")})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "whatever-name"
    assert body["metadata"] == {"weight_version": "default"}
    choice = body["choices"][0]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason", "matched_stop"}
    assert set(choice["message"]) == {"role", "content", "reasoning_content", "tool_calls"}
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == EOS_TOKEN_ID
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                          "reasoning_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] is None


async def test_default_chat_output_is_16_words_split_between_reasoning_and_content():
    message = (await chat(KIMI, {"messages": user("hello")})).json()["choices"][0]["message"]
    assert len(message["reasoning_content"].split()) == 8
    assert len(message["content"].split()) == 8


async def test_output_is_deterministic_and_depends_on_prompt_and_temperature():
    async with client_for(create_sglang_app(KIMI)) as client:
        async def content(text: str, temperature: float) -> str:
            body = {"messages": user(text), "temperature": temperature}
            return (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
        first = await content("hello", 1.0)
        assert first == await content("hello", 1.0)
        assert first != await content("goodbye", 1.0)
        assert first != await content("hello", 0.6)


async def test_max_tokens_caps_words_and_finishes_with_length():
    body = (await chat(KIMI, {"messages": user("hi"), "max_tokens": 6})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None
    words = choice["message"]["reasoning_content"].split() + choice["message"]["content"].split()
    assert len(words) == 6
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["reasoning_tokens"] == 3


async def test_stop_string_cuts_content_and_is_reported_as_matched_stop():
    options = SglangOptions()
    plain = (await chat(options, {"messages": user("hi"), "max_tokens": 12,
                                  "chat_template_kwargs": {"thinking": False}})).json()
    words = plain["choices"][0]["message"]["content"].split()
    stop_word = words[5]
    cut = (await chat(options, {"messages": user("hi"), "max_tokens": 12, "stop": [stop_word],
                                "chat_template_kwargs": {"thinking": False}})).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["matched_stop"] == stop_word
    assert stop_word not in cut["message"]["content"]
    assert plain["choices"][0]["message"]["content"].startswith(cut["message"]["content"])


async def test_thinking_false_in_chat_template_kwargs_disables_reasoning():
    body = (await chat(KIMI, {"messages": user("hi"), "chat_template_kwargs": {"thinking": False}})).json()
    assert body["choices"][0]["message"]["reasoning_content"] is None
    assert body["usage"]["reasoning_tokens"] == 0
    assert len(body["choices"][0]["message"]["content"].split()) == 16


async def test_enable_thinking_does_nothing():
    body = (await chat(KIMI, {"messages": user("hi"), "chat_template_kwargs": {"enable_thinking": False}})).json()
    assert body["choices"][0]["message"]["reasoning_content"]


async def test_without_reasoning_parser_thinking_stays_in_content():
    body = (await chat(SglangOptions(), {"messages": user("hi")})).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] is None
    assert "</think>" in message["content"]
    assert body["usage"]["reasoning_tokens"] == 0


# --- tools and response_format -------------------------------------------------------------------


async def test_tool_call_when_user_asks_for_a_declared_function():
    body = (await chat(KIMI, {"messages": user("please call get_weather now"), "tools": [WEATHER_TOOL]})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "functions.get_weather:0" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)


async def test_tool_call_index_counts_tool_calls_already_in_history():
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "functions.get_weather:1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "rain"},
        {"role": "user", "content": "now call get_weather again"},
    ]
    body = (await chat(KIMI, {"messages": history, "tools": [WEATHER_TOOL]})).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["id"] == "functions.get_weather:2"


@pytest.mark.parametrize("tool_choice, expect_call", [
    ("none", False),
    ("auto", False),
    ("required", True),
    ({"type": "function", "function": {"name": "get_weather"}}, True),
])
async def test_tool_choice_decides_without_a_mention(tool_choice, expect_call):
    body = (await chat(KIMI, {"messages": user("hello"), "tools": [WEATHER_TOOL],
                              "tool_choice": tool_choice})).json()
    assert (body["choices"][0]["message"]["tool_calls"] is not None) is expect_call


async def test_tool_choice_none_wins_over_a_mention():
    body = (await chat(KIMI, {"messages": user("call get_weather"), "tools": [WEATHER_TOOL],
                              "tool_choice": "none"})).json()
    assert body["choices"][0]["message"]["tool_calls"] is None


async def test_streamed_tool_call_deltas_follow_openai_shape():
    response = await chat(KIMI, {"messages": user("call get_weather"), "tools": [WEATHER_TOOL], "stream": True})
    chunks = [p for p in sse_payloads(response.text) if p != "[DONE]"]
    tool_deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                   if c["choices"] and c["choices"][0]["delta"]["tool_calls"]]
    head, *fragments = tool_deltas
    assert head == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}
    assert 2 <= len(fragments) <= 3
    assert all(f["id"] is None and f["function"]["name"] is None and f["index"] == 0 for f in fragments)
    json.loads("".join(f["function"]["arguments"] for f in fragments))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_object_response_format_gives_json_content():
    body = (await chat(KIMI, {"messages": user("hi"), "response_format": {"type": "json_object"}})).json()
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


async def test_json_schema_response_format_fills_required_properties():
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "ok": {"type": "boolean"}, "extra": {"type": "string"}},
              "required": ["name", "age", "ok"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    body = (await chat(KIMI, {"messages": user("hi"), "response_format": response_format})).json()
    value = json.loads(body["choices"][0]["message"]["content"])
    assert set(value) == {"name", "age", "ok"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int) and value["ok"] is True


# --- streaming -----------------------------------------------------------------------------------


async def test_chat_stream_shape():
    body = {"model": "kimi", "messages": user("hi"), "stream": True, "stream_options": {"include_usage": True}}
    response = await chat(KIMI, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    first, *middle, finish, usage_chunk, _ = payloads
    assert first["object"] == "chat.completion.chunk" and first["model"] == "kimi"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "reasoning_content": None,
                                            "tool_calls": None}
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert all(c["usage"] is None for c in [first, *middle, finish])  # model_dump_json keeps the null
    assert set(finish["choices"][0]["delta"].values()) == {None}
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["matched_stop"] == EOS_TOKEN_ID
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["reasoning_tokens"] == 8
    assert len({p["id"] for p in payloads[:-1]}) == 1


async def test_stream_sends_reasoning_deltas_before_content_deltas_and_matches_non_stream():
    request = {"messages": user("order please"), "max_tokens": 10}
    async with client_for(create_sglang_app(KIMI)) as client:
        whole = (await client.post("/v1/chat/completions", json=request)).json()["choices"][0]["message"]
        streamed = await client.post("/v1/chat/completions", json={**request, "stream": True})
    deltas = [p["choices"][0]["delta"] for p in sse_payloads(streamed.text)[1:-2]]
    kinds = ["reasoning" if d["reasoning_content"] is not None else "content" for d in deltas]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning") and "reasoning" in kinds
    assert "".join(d["reasoning_content"] or "" for d in deltas) == whole["reasoning_content"]
    assert "".join(d["content"] or "" for d in deltas) == whole["content"]


async def test_stream_without_include_usage_has_no_usage_chunk():
    payloads = sse_payloads((await chat(KIMI, {"messages": user("hi"), "stream": True})).text)
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(p["usage"] is None and p["choices"] for p in payloads[:-1])


# --- completions ---------------------------------------------------------------------------------


async def test_completions_default_to_16_tokens_and_length():
    async with client_for(create_sglang_app(KIMI)) as client:
        body = (await client.post("/v1/completions", json={"model": "kimi", "prompt": "Once"})).json()
    assert body["object"] == "text_completion" and body["model"] == "kimi"
    choice = body["choices"][0]
    assert len(choice["text"].split()) == 16
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None
    assert body["usage"]["completion_tokens"] == 16 and body["metadata"] == {"weight_version": "default"}


async def test_completions_stream_ends_with_finish_chunk_usage_and_done():
    request = {"prompt": "Once", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    async with client_for(create_sglang_app(KIMI)) as client:
        payloads = sse_payloads((await client.post("/v1/completions", json=request)).text)
    assert payloads[-1] == "[DONE]"
    texts, finish, usage = payloads[:-3], payloads[-3], payloads[-2]
    assert len(texts) == 3 and all(p["object"] == "text_completion" and p["usage"] is None for p in texts)
    assert finish["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                                    "matched_stop": None}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


# --- request errors ------------------------------------------------------------------------------


def assert_flat_error(response, status: int, error_type: str) -> dict:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert body["object"] == "error" and body["type"] == error_type
    assert body["param"] is None and body["code"] == status
    return body


async def test_malformed_json_is_a_flat_bad_request():
    async with client_for(create_sglang_app(KIMI)) as client:
        response = await client.post("/v1/chat/completions", content=b"{not json",
                                     headers={"content-type": "application/json"})
    assert_flat_error(response, 400, "Bad Request")


@pytest.mark.parametrize("body", [{"model": "kimi"}, {"messages": "hello"}, {"messages": [{"content": "x"}]},
                                  {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}])
async def test_invalid_request_is_400_bad_request_not_422(body):
    assert_flat_error(await chat(KIMI, body), 400, "Bad Request")


async def test_non_json_content_type_is_rejected():
    async with client_for(create_sglang_app(KIMI)) as client:
        response = await client.post("/v1/chat/completions", content=b"messages=hi",
                                     headers={"content-type": "application/x-www-form-urlencoded"})
    body = assert_flat_error(response, 400, "Bad Request")
    assert body["message"] == "Unsupported Media Type: Only 'application/json' is allowed"


# --- auth, health, info, metrics -----------------------------------------------------------------


async def test_api_key_guards_normal_endpoints_but_not_health_or_metrics():
    options = SglangOptions(api_key="secret", enable_metrics=True)
    async with client_for(create_sglang_app(options)) as client:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/model_info"),
                             ("POST", "/load_lora_adapter"), ("GET", "/flush_cache")]:
            response = await client.request(method, path, json={"messages": user("hi")})
            assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}, path
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200


async def test_health_is_503_while_starting_then_200_with_empty_body():
    now = [100.0]
    app = create_sglang_app(SglangOptions(startup_delay_s=30.0, clock=lambda: now[0]))
    async with client_for(app) as client:
        for path in ("/health", "/health_generate"):
            assert (await client.get(path)).status_code == 503
        now[0] += 31.0
        response = await client.get("/health")
        assert response.status_code == 200 and response.content == b""
        assert (await client.get("/health_generate")).status_code == 200


async def test_emulator_health_switch_makes_health_503():
    async with client_for(create_sglang_app(KIMI)) as client:
        await client.post("/_emulator/health", json={"healthy": False})
        assert (await client.get("/health")).status_code == 503
        await client.post("/_emulator/reset")
        assert (await client.get("/health")).status_code == 200


async def test_model_info_and_server_info():
    async with client_for(create_sglang_app(KIMI)) as client:
        info = (await client.get("/model_info")).json()
        server = (await client.get("/server_info")).json()
    assert set(info) == {"model_path", "tokenizer_path", "is_generation", "preferred_sampling_params",
                         "weight_version", "has_image_understanding", "has_audio_understanding", "model_type",
                         "architectures"}
    assert server["version"] == "0.7.2" and server["reasoning_parser"] == "kimi_k2"
    assert "internal_states" in server


async def test_metrics_need_enable_metrics_and_count_requests():
    async with client_for(create_sglang_app(KIMI)) as client:
        assert (await client.get("/metrics")).status_code == 404
    async with client_for(create_sglang_app(SglangOptions(enable_metrics=True))) as client:
        await client.post("/v1/chat/completions", json={"messages": user("hi")})
        text = (await client.get("/metrics")).text
    assert 'sglang:num_requests_total{model_name="kimi"} 1.0' in text
    assert "sglang:num_running_reqs{" in text and "sglang:generation_tokens_total{" in text


async def test_flush_cache_answers_plain_text():
    async with client_for(create_sglang_app(KIMI)) as client:
        response = await client.post("/flush_cache")
    assert response.status_code == 200 and response.text.startswith("Cache flushed.\n")


async def test_cache_report_counts_a_repeated_prompt_as_cached():
    async with client_for(create_sglang_app(SglangOptions(enable_cache_report=True))) as client:
        first = (await client.post("/v1/chat/completions", json={"messages": user("hi")})).json()["usage"]
        second = (await client.post("/v1/chat/completions", json={"messages": user("hi")})).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": second["prompt_tokens"]}


# --- faults and the request log ------------------------------------------------------------------


async def test_status_fault_answers_native_error_count_times():
    async with client_for(create_sglang_app(KIMI)) as client:
        assert (await client.post("/_emulator/faults", json={"status": 503, "count": 2})).status_code == 200
        statuses = []
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json={"messages": user("hi")})
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert_flat_error(response, 503, "Service Unavailable")
    assert statuses == [503, 503, 200]


async def test_delay_fault_sleeps_before_the_first_byte():
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async with client_for(create_sglang_app(SglangOptions(sleep=fake_sleep))) as client:
        await client.post("/_emulator/faults", json={"delay_first_byte_s": 2.0, "count": 1})
        assert (await client.post("/v1/chat/completions", json={"messages": user("hi")})).status_code == 200
        assert (await client.post("/v1/chat/completions", json={"messages": user("hi")})).status_code == 200
    assert slept == [2.0]


async def test_stream_error_fault_sends_error_event_under_200_then_done():
    async with client_for(create_sglang_app(KIMI)) as client:
        await client.post("/_emulator/faults", json={"stream_error_after": 2, "count": 1})
        response = await client.post("/v1/chat/completions", json={"messages": user("hi"), "stream": True})
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert len(payloads) == 4 and payloads[-1] == "[DONE]"
    assert "choices" in payloads[0] and "choices" in payloads[1]
    error = payloads[2]["error"]
    assert error["object"] == "error" and error["type"] == "BadRequestError" and error["code"] == 400


async def test_drop_fault_cuts_the_stream():
    async with client_for(create_sglang_app(KIMI)) as client:
        await client.post("/_emulator/faults", json={"drop_mid_stream_after": 3})
        with pytest.raises(EmulatedDisconnect):
            await client.post("/v1/chat/completions", json={"messages": user("hi"), "stream": True})
        ok = await client.post("/v1/chat/completions", json={"messages": user("hi"), "stream": True})
    assert sse_payloads(ok.text)[-1] == "[DONE]"


async def test_faulty_events_yields_exactly_n_events_before_dropping():
    received = []
    with pytest.raises(EmulatedDisconnect):
        async for event in faulty_events([b"a", b"b", b"c", b"d"], Fault(drop_mid_stream_after=3), b"err"):
            received.append(event)
    assert received == [b"a", b"b", b"c"]


async def test_stream_only_faults_wait_for_a_streaming_request():
    async with client_for(create_sglang_app(KIMI)) as client:
        await client.post("/_emulator/faults", json={"stream_error_after": 1})
        assert (await client.post("/v1/chat/completions", json={"messages": user("hi")})).status_code == 200
        assert len((await client.get("/_emulator/faults")).json()["pending"]) == 1


@pytest.mark.parametrize("fault", [{}, {"count": 2}, {"status": 503, "bogus": 1}, {"status": 503, "count": 0}, []])
async def test_invalid_fault_is_rejected(fault):
    async with client_for(create_sglang_app(KIMI)) as client:
        assert (await client.post("/_emulator/faults", json=fault)).status_code == 400


async def test_request_log_records_bodies_and_authorization_presence_then_resets():
    async with client_for(create_sglang_app(KIMI)) as client:
        await client.post("/v1/chat/completions", json={"messages": user("one")})
        await client.post("/v1/completions", json={"prompt": "two"}, headers={"Authorization": "Bearer x"})
        log = (await client.get("/_emulator/requests")).json()
        await client.post("/_emulator/reset")
        after = (await client.get("/_emulator/requests")).json()
    assert [entry["path"] for entry in log] == ["/v1/chat/completions", "/v1/completions"]
    assert log[0]["body"] == {"messages": user("one")} and log[1]["body"] == {"prompt": "two"}
    assert [entry["has_authorization"] for entry in log] == [False, True]
    assert "authorization" not in log[1]["headers"]
    assert after == []


async def test_requests_rejected_by_auth_are_logged_too():
    async with client_for(create_sglang_app(SglangOptions(api_key="secret"))) as client:
        rejected = await client.post("/v1/chat/completions", json={"messages": user("no key")})
        await client.post("/v1/chat/completions", json={"messages": user("key")},
                          headers={"Authorization": "Bearer secret"})
        log = (await client.get("/_emulator/requests")).json()
    assert rejected.status_code == 401
    assert [(e["body"]["messages"][0]["content"], e["has_authorization"]) for e in log] == [
        ("no key", False), ("key", True)]


async def test_one_token_while_thinking_has_no_reasoning_content():
    body = (await chat(KIMI, {"messages": user("hi"), "max_tokens": 1})).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] is None and len(message["content"].split()) == 1

"""The SGLang emulator's timing and health (sglang-kt.md §2.1, §2.6): the stream head before prefill,
`/health` as a one-token generation with its timeout, engine stalls, 5xx in-stream errors, raw bodies."""

from __future__ import annotations

import asyncio
import json

from tests.emulators.sglang import SglangOptions, create_sglang_app
from tests.emulators.sglang_state import SglangState
from tests.unit.emulators.helpers import client_for, sse_payloads, user, write_adapter

KIMI = dict(reasoning_parser="kimi_k2", tool_call_parser="kimi_k2")


async def asgi_messages(app, body: dict, log: list) -> None:
    """Call the app as a server would and record each ASGI message it sends, in order, into `log`."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"host", b"emulator")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "root_path": ""}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        log.append(("start", message["status"]) if message["type"] == "http.response.start"
                   else ("body", bool(message.get("body"))))
    await app(scope, receive, send)


def recording_sleep(log: list):
    async def sleep(seconds: float) -> None:
        log.append(("sleep", seconds))
    return sleep


async def test_stream_head_goes_out_before_the_prefill():
    log: list = []
    options = SglangOptions(prefill_delay_s=2.5, sleep=recording_sleep(log), **KIMI)
    await asgi_messages(create_sglang_app(options), {"messages": user("hi"), "stream": True}, log)
    assert log[0] == ("start", 200)
    assert log[1] == ("sleep", 2.5)
    assert log[2] == ("body", True)


async def test_prefill_fault_adds_to_the_option_and_holds_a_non_stream_answer():
    log: list = []
    options = SglangOptions(prefill_delay_s=1.0, sleep=recording_sleep(log), **KIMI)
    app = create_sglang_app(options)
    async with client_for(app) as client:
        await client.post("/_emulator/faults", json={"delay_prefill_s": 2.0})
        response = await client.post("/v1/chat/completions", json={"messages": user("hi")})
    assert response.status_code == 200 and log == [("sleep", 3.0)]


async def test_unknown_adapter_is_refused_in_band_without_a_prefill(tmp_path):
    log: list = []
    options = SglangOptions(prefill_delay_s=5.0, enable_lora=True, sleep=recording_sleep(log), **KIMI)
    await asgi_messages(create_sglang_app(options), {"model": "kimi:nope", "messages": user("hi"), "stream": True},
                        log)
    assert ("sleep", 5.0) not in log and log[0] == ("start", 200)


async def test_health_is_a_generation_that_a_stalled_engine_times_out():
    app = create_sglang_app(SglangOptions(health_timeout_s=0.2, **KIMI))
    async with client_for(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/_emulator/stall", json={"seconds": 5})).status_code == 200
        started = asyncio.get_running_loop().time()
        assert (await client.get("/health")).status_code == 503
        assert asyncio.get_running_loop().time() - started >= 0.2
        await client.post("/_emulator/reset")
        assert (await client.get("/health_generate")).status_code == 200


async def test_a_stall_also_holds_the_first_token_of_requests():
    app = create_sglang_app(SglangOptions(**KIMI))
    async with client_for(app) as client:
        started = asyncio.get_running_loop().time()
        await client.post("/_emulator/stall", json={"seconds": 0.3})
        response = await client.post("/v1/chat/completions", json={"messages": user("hi")})
    assert response.status_code == 200 and asyncio.get_running_loop().time() - started >= 0.3


async def test_slow_prefills_in_flight_do_not_hold_health():
    options = SglangOptions(prefill_delay_s=1.0, health_timeout_s=0.3, **KIMI)
    state = SglangState(options)
    app = create_sglang_app(options, state)
    async with client_for(app) as client:
        slow = [asyncio.create_task(client.post("/v1/chat/completions", json={"messages": user(f"q{i}")}))
                for i in range(3)]
        await asyncio.sleep(0.1)
        assert state.in_flight == 3
        assert (await client.get("/health")).status_code == 200
        assert all(r.status_code == 200 for r in await asyncio.gather(*slow))
    assert state.in_flight == 0 and state.idle.is_set()


async def test_exiting_server_answers_health_503_and_still_serves():
    state = SglangState(SglangOptions(**KIMI))
    async with client_for(create_sglang_app(state.options, state)) as client:
        state.gracefully_exiting = True  # what SIGTERM sets (the runner's DrainingServer)
        assert (await client.get("/health")).status_code == 503
        assert (await client.post("/v1/chat/completions", json={"messages": user("hi")})).status_code == 200


async def test_bad_stall_body_is_rejected():
    async with client_for(create_sglang_app(SglangOptions())) as client:
        for body in ({}, {"seconds": -1}, {"seconds": "x"}, [1]):
            assert (await client.post("/_emulator/stall", json=body)).status_code == 400


async def test_stream_error_fault_can_carry_a_5xx_code_in_json_dumps_form():
    async with client_for(create_sglang_app(SglangOptions(**KIMI))) as client:
        await client.post("/_emulator/faults", json={"stream_error_after": 1, "stream_error_code": 500})
        response = await client.post("/v1/chat/completions", json={"messages": user("hi"), "stream": True})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[1].startswith('data: {"error": {"object": "error", ')  # Python's json.dumps separators
    error = sse_payloads(response.text)[1]["error"]
    assert error == {"object": "error", "message": "Internal server error: emulated scheduler abort",
                     "type": "InternalServerError", "param": None, "code": 500}
    assert events[-1] == "data: [DONE]"


async def test_raw_body_fault_answers_verbatim():
    page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    async with client_for(create_sglang_app(SglangOptions())) as client:
        await client.post("/_emulator/faults", json={"raw_body": page, "status": 502})
        await client.post("/_emulator/faults", json={"raw_body": "not json", "content_type": "application/json"})
        proxy = await client.post("/v1/chat/completions", json={"messages": user("hi")})
        garbled = await client.post("/v1/chat/completions", json={"messages": user("hi")})
    assert proxy.status_code == 502 and proxy.text == page and proxy.headers["content-type"].startswith("text/html")
    assert garbled.status_code == 200 and garbled.text == "not json"


async def test_fault_keys_that_need_a_partner_are_rejected():
    async with client_for(create_sglang_app(SglangOptions())) as client:
        assert (await client.post("/_emulator/faults", json={"stream_error_code": 500})).status_code == 400
        assert (await client.post("/_emulator/faults", json={"content_type": "text/html"})).status_code == 400


async def test_a_fault_with_a_path_waits_for_that_endpoint(tmp_path):
    async with client_for(create_sglang_app(SglangOptions(enable_lora=True))) as client:
        await client.post("/_emulator/faults", json={"path": "/load_lora_adapter", "raw_body": "<html>502</html>",
                                                     "status": 502})
        chat = await client.post("/v1/chat/completions", json={"messages": user("hi")})
        load = await client.post("/load_lora_adapter",
                                 json={"lora_name": "a", "lora_path": write_adapter(tmp_path / "a")})
    assert chat.status_code == 200 and (load.status_code, load.text) == (502, "<html>502</html>")

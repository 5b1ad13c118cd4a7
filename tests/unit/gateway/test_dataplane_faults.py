"""The app with scripted fake drivers, failing in the ways issue 14 names: a stream that fails after its first
byte (whatever raised), first-byte timeouts and account errors (never retried on the same backend), broken
backend bodies (502, never the client's "could not parse")."""
import asyncio

import orjson
import pytest

from backends.errors import (
    BackendAccountError,
    BackendError,
    BackendFirstByteTimeoutError,
    BackendProtocolError,
    BackendTimeoutError,
    BackendUnavailableError,
)
from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.app_client import running
from tests.emulators.fake_driver import FakeDriver, FakeReply, Step
from tests.unit.gateway.test_dataplane import CHAT, CONFIG, make_client, post, state_dir  # noqa: F401 (fixture)

STREAM = {**CHAT, "stream": True}


async def requests_counted(client) -> dict[str, float]:
    """kimi_gateway_requests_total by code (the non-zero ones)."""
    counted: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("kimi_gateway_requests_total{"):
            code, value = line.split('code="', 1)[1].split('"', 1)[0], float(line.rsplit(" ", 1)[1])
            if value:  # series known from config exist at zero from the start
                counted[code] = counted.get(code, 0) + value
    return counted


def events_of(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


@pytest.mark.parametrize("failure, code, error_type", [
    (BackendUnavailableError("reset", backend="one"), "502", "server_error"),
    (BackendTimeoutError("idle timeout (1s)", backend="one"), "504", "server_error"),
    (KeyError("a bug of ours"), "500", "server_error"),
    (RuntimeError("another bug"), "500", "server_error"),
])
async def test_stream_failing_after_its_first_byte_ends_with_one_error_and_done_and_counts_as_failed(
        failure, code, error_type):
    one = FakeDriver("one", [Step(fail_after=1, error_after=failure)])
    async with make_client(one, FakeDriver("two")) as client:
        response = await post(client, STREAM)
        counted = await requests_counted(client)
    events = events_of(response.text)
    assert response.status_code == 200 and len(events) == 3 and events[2] == "data: [DONE]"
    error = orjson.loads(events[1][6:])["error"]
    assert error["type"] == error_type and error["code"] is None  # OpenAI's schema: a string or null there
    assert "a bug of ours" not in response.text and "another bug" not in response.text
    assert counted == {code: 1.0}
    assert one.replies[0].closed


async def test_unexpected_error_event_names_the_request_id():
    one = FakeDriver("one", [Step(fail_after=1, error_after=ZeroDivisionError())])
    async with make_client(one, FakeDriver("two")) as client:
        response = await post(client, STREAM)
    assert response.headers["x-request-id"] in orjson.loads(events_of(response.text)[1][6:])["error"]["message"]


async def test_a_clean_stream_counts_as_200():
    async with make_client(FakeDriver("one"), FakeDriver("two")) as client:
        await post(client, STREAM)
        assert await requests_counted(client) == {"200": 1.0}


async def test_first_byte_timeout_is_not_retried_on_the_same_backend_but_falls_back():
    one = FakeDriver("one", [Step(error=BackendFirstByteTimeoutError("first byte timeout (1s)", backend="one"))] * 3)
    two = FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, STREAM)
    assert response.status_code == 200 and response.headers["x-kimi-backend"] == "two"
    assert len(one.requests) == 1  # the prefill was not run again there


async def test_first_byte_timeout_on_the_last_target_is_504():
    timeout = lambda name: FakeDriver(name, [Step(error=BackendFirstByteTimeoutError("first byte", backend=name))] * 3)
    one, two = timeout("one"), timeout("two")
    async with make_client(one, two) as client:
        response = await post(client, CHAT)
    assert response.status_code == 504 and (len(one.requests), len(two.requests)) == (1, 1)


async def test_account_error_is_not_retried():
    refused = lambda name: FakeDriver(name, [Step(error=BackendAccountError("key refused (401)", backend=name))] * 3)
    one, two = refused("one"), refused("two")
    async with make_client(one, two) as client:
        response = await post(client, CHAT)
    assert response.status_code == 503 and (len(one.requests), len(two.requests)) == (1, 1)


async def test_a_broken_backend_body_is_a_502_not_the_clients_parse_error():
    broken = lambda name: FakeDriver(name, [Step(error=BackendProtocolError("not JSON", backend=name))] * 3)
    async with make_client(broken("one"), broken("two")) as client:
        response = await post(client, CHAT)
    assert response.status_code == 502 and "could not parse" not in response.text


async def test_a_json_error_inside_the_gateway_is_an_internal_error_not_the_clients_fault():
    """Only the client's own body may earn "We could not parse the JSON body of your request"."""
    bad = orjson.JSONDecodeError("Expecting value", "<html>", 0)
    odd = lambda name: FakeDriver(name, [Step(error=bad)] * 3)  # what a driver parsing a proxy page used to leak
    async with make_client(odd("one"), odd("two")) as client:
        response = await post(client, CHAT)
        garbage = await post(client, b"{not json")
    assert response.status_code == 500 and "could not parse" not in response.text
    assert garbage.status_code == 400 and "could not parse" in garbage.text


def test_every_backend_error_kind_has_a_client_status():
    from gateway.errors import from_backend_error
    assert from_backend_error(BackendProtocolError("x")).status_code == 502
    assert from_backend_error(BackendAccountError("x")).status_code == 503
    assert from_backend_error(BackendFirstByteTimeoutError("x")).status_code == 504
    assert from_backend_error(BackendError("x")).status_code == 503


class StalledReply(FakeReply):
    """A stream that sends its first event, then nothing: the backend is still generating."""

    async def events(self):
        yield self.step.events[0]
        await asyncio.Event().wait()


class StallingDriver(FakeDriver):
    async def send(self, request):
        reply = StalledReply(Step(), request.model)
        self.requests.append(request)
        self.replies.append(reply)
        return reply


@pytest.mark.parametrize("hang_up_after_s", [0.0, 0.2])   # before and after the watch starts (WATCH_AFTER_S)
async def test_a_client_that_hangs_up_aborts_the_upstream_and_counts_499(hang_up_after_s):
    one = StallingDriver("one")
    app = create_app(GatewayConfig.model_validate(CONFIG), drivers={"one": one, "two": FakeDriver("two")})
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"content-type", b"application/json")], "query_string": b"", "server": ("127.0.0.1", 8080)}
    messages = [{"type": "http.request", "body": orjson.dumps(STREAM), "more_body": False}]
    first_event, hung_up, sent = asyncio.Event(), asyncio.Event(), []

    async def receive():   # the body; then, once the client hangs up, `http.disconnect`
        if messages:
            return messages.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body":
            first_event.set()

    async with running(app) as client:
        serving = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(first_event.wait(), 5)
        await asyncio.sleep(hang_up_after_s)
        hung_up.set()
        await asyncio.wait_for(serving, 5)   # the request's task ends: not left streaming to nobody
        counted = await requests_counted(client)
    assert one.replies[0].closed   # the upstream stream was closed (its connection is released)
    assert counted == {"499": 1}
    assert [m for m in sent if m["type"] == "http.response.body"][-1].get("more_body")   # no end was sent

"""The app with scripted fake drivers: headers, errors, retries, fallback, stream failures."""
import re

import orjson
import pytest

from backends.errors import BackendRateLimitedError, BackendRejectedError, BackendUnavailableError
from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.app_client import running, write_adapter_set
from tests.emulators.fake_driver import FakeDriver, Step, chunk
from tests.openai_spec import assert_conforms

CONFIG = {
    "backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"},
                 {"name": "two", "kind": "sglang", "url": "http://127.0.0.1:9"}],
    "adapters": [{"name": "ada", "gguf": "<gguf>", "profile": "instant", "backends": ["one"]}],
    "routes": [{"name": "kimi", "targets": ["one", "two"]},
               {"name": "ab", "experiment": {"variants": {"ada": 1, "kimi": 1}}}],
}
CHAT = {"model": "kimi", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    files = write_adapter_set(tmp_path / "adapters")
    monkeypatch.setitem(CONFIG, "state_dir", str(tmp_path / "state"))
    monkeypatch.setitem(CONFIG, "adapter_roots", [str(tmp_path / "adapters")])
    monkeypatch.setitem(CONFIG, "adapters", [{**CONFIG["adapters"][0], "gguf": files["gguf"]}])


def make_client(one: FakeDriver, two: FakeDriver, **overrides):
    config = GatewayConfig.model_validate({**CONFIG, **overrides})
    return running(create_app(config, drivers={"one": one, "two": two}))


async def post(client, body, path="/v1/chat/completions"):
    return await client.post(path, content=body if isinstance(body, bytes) else orjson.dumps(body))


async def test_answer_says_the_asked_model_and_sets_headers():
    one, two = FakeDriver("one"), FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, CHAT)
    assert response.status_code == 200
    assert response.json()["model"] == "kimi"
    assert response.headers["x-kimi-backend"] == "one"
    assert response.headers["x-kimi-adapter"] == ""
    assert response.headers["x-kimi-sampling"] == "default"
    assert len(response.headers["x-request-id"]) == 24
    sent = one.requests[0]
    assert sent.sampling == {"temperature": 1.0, "top_p": 0.95, "min_p": 0.01} and sent.thinking is True


async def test_adapter_route_uses_its_profile():
    one, two = FakeDriver("one"), FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, {**CHAT, "model": "ada"})
    label = response.headers["x-kimi-adapter"]
    assert re.fullmatch(r"ada@[0-9a-f]{8}", label)
    assert one.requests[0].adapter == label and one.requests[0].sampling["temperature"] == 0.6
    assert one.requests[0].thinking is False


async def test_experiment_sets_variant_header():
    one, two = FakeDriver("one"), FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, {**CHAT, "model": "ab", "user": "alice"})
        again = await post(client, {**CHAT, "model": "ab", "user": "alice"})
    assert response.headers["x-kimi-variant"] in ("ada", "kimi")
    assert again.headers["x-kimi-variant"] == response.headers["x-kimi-variant"]
    assert response.json()["model"] == "ab"


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "could not parse the JSON"),
    ({**CHAT, "model": "nope"}, 404, "does not exist"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "bogus": 1}, 400, "Unrecognized request argument supplied: bogus"),
    ({"model": "kimi"}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}],
      "model": "ada"}, 400, "no vision"),
])
async def test_client_errors_are_openai_shaped(body, status, fragment):
    async with make_client(FakeDriver("one", vision=False), FakeDriver("two")) as client:
        response = await post(client, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    assert response.headers["x-request-id"]


async def test_image_goes_to_the_vision_target():
    one, two = FakeDriver("one", vision=False), FakeDriver("two")
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "what"},
                                                              {"type": "image_url", "image_url": {"url": "data:x"}}]}]}
    async with make_client(one, two) as client:
        response = await post(client, body)
    assert response.status_code == 200 and response.headers["x-kimi-backend"] == "two"


def image_chat(url: str, model: str = "kimi") -> dict:
    return {**CHAT, "model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": url}}]}]}


async def test_image_urls_follow_the_route_s_mode():
    """Forward mode sends the re-serialised URL; the default (fetch) never lets a private URL through."""
    routes = [{"name": "kimi", "targets": ["two"]}, {"name": "open", "targets": ["two"], "image_urls": "forward"}]
    two = FakeDriver("two")
    async with make_client(FakeDriver("one"), two, routes=routes) as client:
        forwarded = await post(client, image_chat("HTTP://8.8.8.8:80/cat.png#x", model="open"))
        private = await post(client, image_chat("http://10.0.0.1/cat.png"))
        odd = await post(client, image_chat("http://0x7f.1/cat.png", model="open"))
    assert forwarded.status_code == 200
    assert two.requests[0].body["messages"][0]["content"][1]["image_url"]["url"] == "http://8.8.8.8/cat.png"
    assert private.status_code == 400 and odd.status_code == 400 and len(two.requests) == 1
    assert private.json()["error"]["param"] == "messages[0].content[1].image_url"
    assert "must point to public addresses" in private.json()["error"]["message"]
    assert "unusual IPv4 host form" in odd.json()["error"]["message"]


async def test_retry_then_success_on_same_backend():
    one = FakeDriver("one", [Step(error=BackendUnavailableError("refused", backend="one")), Step()])
    async with make_client(one, FakeDriver("two")) as client:
        response = await post(client, CHAT)
    assert response.status_code == 200 and response.headers["x-kimi-backend"] == "one"
    assert len(one.requests) == 2


async def test_fallback_to_next_target_when_first_is_down():
    down = [Step(error=BackendUnavailableError("refused", backend="one")) for _ in range(5)]
    one, two = FakeDriver("one", down), FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, CHAT)
    assert response.status_code == 200 and response.headers["x-kimi-backend"] == "two"
    assert len(one.requests) == 2  # the configured attempts, then fallback


async def test_all_down_is_503():
    down = lambda name: FakeDriver(name, [Step(error=BackendUnavailableError("refused", backend=name))] * 5)
    async with make_client(down("one"), down("two")) as client:
        response = await post(client, CHAT)
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"


async def test_client_error_from_backend_does_not_fall_back():
    one = FakeDriver("one", [Step(error=BackendRejectedError("too long", status=400, backend="one"))])
    two = FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, CHAT)
    assert response.status_code == 400 and response.json()["error"]["message"] == "too long"
    assert two.requests == []


async def test_rate_limit_without_a_short_retry_after_is_429_with_header():
    limited = lambda name: FakeDriver(name, [Step(error=BackendRateLimitedError("slow", backend=name, retry_after_s=30))])
    async with make_client(limited("one"), limited("two")) as client:
        response = await post(client, CHAT)
    assert response.status_code == 429 and response.headers["retry-after"] == "30"


async def test_stream_relays_events_and_ends_with_done():
    one = FakeDriver("one")
    async with make_client(one, FakeDriver("two")) as client:
        response = await post(client, {**CHAT, "stream": True})
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text.endswith("data: [DONE]\n\n") and '"model":"kimi"' in response.text
    assert one.replies[0].closed


async def test_stream_failure_before_first_event_falls_back():
    one = FakeDriver("one", [Step(fail_after=0, error_after=BackendUnavailableError("reset", backend="one"))] * 2)
    two = FakeDriver("two")
    async with make_client(one, two) as client:
        response = await post(client, {**CHAT, "stream": True})
    assert response.status_code == 200 and response.headers["x-kimi-backend"] == "two"


async def test_stream_failure_after_first_byte_is_one_error_event_then_done():
    one = FakeDriver("one", [Step(fail_after=1, error_after=BackendUnavailableError("reset", backend="one"))])
    async with make_client(one, FakeDriver("two")) as client:
        response = await post(client, {**CHAT, "stream": True})
    events = [e for e in response.text.split("\n\n") if e]
    assert events[0] == chunk("hel", "kimi").decode().strip()
    assert orjson.loads(events[1][6:])["error"]["type"] == "server_error"
    assert_conforms("ErrorResponse", orjson.loads(events[1][6:]))
    assert events[2] == "data: [DONE]" and len(events) == 3


async def test_models_lists_routes_only():
    async with make_client(FakeDriver("one"), FakeDriver("two")) as client:
        response = await client.get("/v1/models")
    assert [m["id"] for m in response.json()["data"]] == ["ada", "kimi", "ab"]


async def test_client_keys_and_allowlist(monkeypatch):
    monkeypatch.setenv("TEAM_KEY", "sk-team")
    auth = {"client_keys": [{"name": "team", "key_env": "TEAM_KEY", "models": ["ada"]}]}
    async with make_client(FakeDriver("one"), FakeDriver("two"), auth=auth) as client:
        missing = await post(client, CHAT)
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"})
        denied = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-team"})
        allowed = await client.post("/v1/chat/completions", json={**CHAT, "model": "ada"},
                                    headers={"authorization": "Bearer sk-team"})
        listed = await client.get("/v1/models", headers={"authorization": "Bearer sk-team"})
    assert (missing.status_code, wrong.status_code, denied.status_code, allowed.status_code) == (401, 401, 403, 200)
    assert "kimi" not in denied.json()["error"]["message"]
    assert [m["id"] for m in listed.json()["data"]] == ["ada"]


@pytest.mark.parametrize("role", [["user"], {"r": 1}, 7, None])
async def test_a_role_that_is_not_a_string_is_a_400_not_a_500(role):
    async with make_client(FakeDriver("one"), FakeDriver("two")) as client:
        response = await post(client, {**CHAT, "messages": [{"role": role, "content": "hi"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"

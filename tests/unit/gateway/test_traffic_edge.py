"""The traffic keys at the edge: config validation, deadline and priority headers, the SIGTERM refusal, and
a deadline that passes before the backend answers."""
import asyncio
import json

import orjson
import pytest

from gateway.app import create_app
from gateway.config import ConfigError, GatewayConfig, load_config
from tests.app_client import running
from tests.emulators.fake_driver import FakeDriver

BASE = {"backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi", "targets": ["one"]}]}
CHAT = orjson.dumps({"model": "kimi", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(("patch", "fragment"), [
    ({"shutdown": {"grace_s": -1}}, "shutdown.grace_s"),
    ({"shutdown": {"drain_s": 5}}, "shutdown.drain_s: unknown key"),
    ({"admission": {"max_queue": -1}}, "admission.max_queue"),
    ({"backends": [{**BASE["backends"][0], "max_concurrency": 0}]}, "backends[0].max_concurrency"),
    ({"backends": [{**BASE["backends"][0], "outliers": {"eject_after": 2}}]}, "backends[0].outliers.eject_after"),
    ({"routes": [{**BASE["routes"][0], "timeout_s": 0}]}, "routes[0].timeout_s"),
    ({"auth": {"client_keys": [{"name": "k", "key_env": "K", "priority": "urgent"}]}}, "priority"),
    ({"routes": [{**BASE["routes"][0], "deadline_ms": 10 ** 400}]}, "routes[0].deadline_ms"),
    ({"routes": [{**BASE["routes"][0], "deadline_ms": 86_400_001}]}, "routes[0].deadline_ms"),
    ({"routes": [BASE["routes"][0], {"name": "e", "experiment": {"variants": {"kimi": 10 ** 400}}}]},
     "routes[1].experiment.variants.kimi: Input should be less than or equal to 1000000"),
])
def test_bad_traffic_config_names_the_key(tmp_path, patch, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({**BASE, **patch}))   # YAML reads JSON; json, unlike orjson, writes 10 ** 400
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert fragment in str(error.value)


def app_with(driver: FakeDriver, tmp_path, **overrides):
    config = GatewayConfig.model_validate({**BASE, "state_dir": str(tmp_path), **overrides})
    return create_app(config, drivers={"one": driver})


@pytest.mark.parametrize(("header", "value"), [
    ("x-kimi-deadline-ms", b"soon"), ("x-kimi-deadline-ms", b""), ("x-kimi-deadline-ms", b"-5"),
    ("x-kimi-deadline-ms", b"0"), ("x-kimi-deadline-ms", b"1.5"), ("x-kimi-deadline-ms", b"1e3"),
    ("x-kimi-deadline-ms", b"+100"), ("x-kimi-deadline-ms", b"1_000"), ("x-kimi-deadline-ms", b"NaN"),
    ("x-kimi-deadline-ms", b"86400001"), ("x-kimi-deadline-ms", b"9" * 400), ("x-kimi-deadline-ms", b"9" * 5000),
    ("x-kimi-deadline-ms", "\u0661\u0662".encode()), ("x-kimi-deadline-ms", b"\xff"),
    ("x-kimi-priority", b"urgent"), ("x-kimi-priority", b""), ("x-kimi-priority", b"lo"), ("x-kimi-priority", b"0"),
])
async def test_a_malformed_traffic_header_is_a_400_naming_it(tmp_path, header, value):
    app = app_with(FakeDriver("one"), tmp_path)
    async with running(app) as client:
        response = await client.post("/v1/chat/completions", content=CHAT, headers=[(header.encode(), value)])
    error = response.json()["error"]
    assert response.status_code == 400 and header in error["message"] and error["param"] == header


@pytest.mark.parametrize(("header", "value"), [
    ("x-kimi-deadline-ms", b" 5000 "), ("x-kimi-deadline-ms", b"86400000"), ("x-kimi-priority", b" Low "),
    ("x-kimi-priority", b"HIGH"),   # a normal key asking for high stays normal: documented, not an error
])
async def test_a_well_formed_traffic_header_is_served(tmp_path, header, value):
    app = app_with(FakeDriver("one"), tmp_path)
    async with running(app) as client:
        response = await client.post("/v1/chat/completions", content=CHAT, headers=[(header.encode(), value)])
    assert response.status_code == 200, response.text


class SlowDriver(FakeDriver):
    """Answers after `delay_s`, and notes whether it was cancelled."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("one")
        self.delay_s, self.cancelled = delay_s, False

    async def send(self, request):
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await super().send(request)


async def test_a_deadline_that_passes_before_the_backend_answers_is_a_504_and_cancels_it(tmp_path):
    driver = SlowDriver(5.0)
    app = app_with(driver, tmp_path, routes=[{"name": "kimi", "targets": ["one"], "timeout_s": 0.1}])
    async with running(app) as client:
        response = await client.post("/v1/chat/completions", content=CHAT)
    assert response.status_code == 504 and driver.cancelled


async def test_a_refusing_gateway_answers_503_with_retry_after(tmp_path):
    app = app_with(FakeDriver("one"), tmp_path)
    async with running(app) as client:
        app.state.draining = app.state.refusing = True   # what gateway/shutdown.py sets after grace_s
        response = await client.post("/v1/chat/completions", content=CHAT)
        ready = await client.get("/readyz")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"


async def test_without_a_deadline_the_slow_backend_is_waited_for(tmp_path):
    driver = SlowDriver(0.05)
    app = app_with(driver, tmp_path)
    async with running(app) as client:
        response = await client.post("/v1/chat/completions", content=CHAT)
    assert response.status_code == 200 and not driver.cancelled

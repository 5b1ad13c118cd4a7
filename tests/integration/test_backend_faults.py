"""Retries, timeouts, health and broken answers as the backends really behave (issue 14 part 4), against the
SGLang and Moonshot emulators: time to first token is bounded by the first-byte timeout even though SGLang
sends its head before prefill, and a timed-out prefill is not run again; the hosted API's 401/403/404 and
quota 429 are never retried; health probes never queue behind data-plane streams; a broken backend body is
a 502; a stream that fails after its first byte ends with one error event and `[DONE]` and counts as failed."""
from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from tests.adapter_files import write_peft
from tests.integration.conftest import start_moonshot
from tests.integration.test_moonshot import HOSTED_KEY
from tests.integration.test_sglang import start_sglang

PROMPT = [{"role": "user", "content": "Tell me about the blue river"}]
HEALTH_CYCLE_S = 5.0  # gateway/state.py HEALTH_INTERVAL_S


@pytest.fixture(scope="module")
def sglang(start_process) -> str:
    return start_sglang(start_process, "sglang-faults")


@pytest.fixture(scope="module")
def moonshot(start_process) -> str:
    return start_moonshot(start_process, "moonshot-faults", HOSTED_KEY)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-faults")
    write_peft(root / "medical")
    return root, write_peft(root / "legal")


@pytest.fixture(scope="module")
def gateway(sglang, moonshot, adapter_dir, start_gateway) -> str:
    """Routes onto the same emulators with different timeouts; two data-plane connections for `kt-narrow`."""
    root, legal = adapter_dir
    sglang_backend = {"kind": "sglang", "url": sglang, "retry": {"attempts": 2}}
    return start_gateway({
        "adapter_roots": [str(root)],
        "backends": [
            {"name": "kt", **sglang_backend},
            {"name": "kt-short-first", **sglang_backend, "timeouts": {"first_byte_s": 1.0, "idle_s": 30}},
            {"name": "kt-short-idle", **sglang_backend, "timeouts": {"first_byte_s": 30, "idle_s": 1.0}},
            {"name": "kt-narrow", **sglang_backend, "max_connections": 2},
            {"name": "hosted", "kind": "moonshot", "url": f"{moonshot}/v1", "api_key_env": "MOONSHOT_KEY",
             "models": {"hosted": "kimi-k2.6"}, "timeouts": {"first_byte_s": 1.0, "idle_s": 30},
             "retry": {"attempts": 2, "max_retry_after_s": 2}},
        ],
        "adapters": [{"name": "legal", "source": str(legal), "backends": ["kt"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["kt"]},
                   {"name": "short-first", "targets": ["kt-short-first"]},
                   {"name": "short-idle", "targets": ["kt-short-idle"]},
                   {"name": "narrow", "targets": ["kt-narrow"]},
                   {"name": "hosted", "targets": ["hosted"]}],
    }, name="gateway-faults", env={"MOONSHOT_KEY": HOSTED_KEY, "KIMI_GATEWAY_ADMIN_KEYS": ADMIN_KEY})


def fault(emulator: str, **spec) -> None:
    """Aimed at chat requests: the adapter lifecycle's verification probes (completions) never take one."""
    spec.setdefault("path", "/v1/chat/completions")
    httpx.post(f"{emulator}/_emulator/faults", json=spec, timeout=10).raise_for_status()


def received(emulator: str) -> int:
    entries = httpx.get(f"{emulator}/_emulator/requests", timeout=10).json()
    return sum(entry["path"] == "/v1/chat/completions" for entry in entries)


@pytest.fixture(autouse=True)
def clean(sglang, moonshot):
    for emulator in (sglang, moonshot):
        httpx.post(f"{emulator}/_emulator/reset", timeout=10).raise_for_status()
    yield


def chat(gateway: str, model: str, stream: bool = False, timeout: float = 30, **extra) -> httpx.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": 4, "stream": stream, **extra}
    return httpx.post(f"{gateway}/chat/completions", json=body, timeout=timeout)


def metric(gateway: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{gateway.removesuffix('/v1')}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- time to first token -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_a_prefill_past_the_first_byte_timeout_is_a_504_and_not_run_again(gateway, sglang, stream):
    """SGLang's head comes at once: the first-byte timeout (1 s) must still bound the 3 s prefill, not the
    30 s idle timeout; and the timed-out prefill is not repeated on the same backend."""
    fault(sglang, delay_prefill_s=3, count=2)
    before, started = received(sglang), time.monotonic()
    response = chat(gateway, "short-first", stream=stream)
    assert response.status_code == 504 and response.json()["error"]["type"] == "server_error"
    assert "first byte" in response.json()["error"]["message"]
    assert time.monotonic() - started < 2.9
    assert received(sglang) - before == 1


def test_a_prefill_longer_than_the_idle_timeout_is_fine_within_the_first_byte_timeout(gateway, sglang):
    fault(sglang, delay_prefill_s=2)
    before = received(sglang)
    response = chat(gateway, "short-idle", stream=True)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert '"error"' not in response.text and received(sglang) - before == 1


def test_the_hosted_first_event_is_bounded_by_the_first_byte_timeout(gateway, moonshot):
    fault(moonshot, delay_prefill_s=3, count=2)
    before = received(moonshot)
    response = chat(gateway, "hosted", stream=True)
    assert response.status_code == 504 and received(moonshot) - before == 1


# --- hosted retries ------------------------------------------------------------------------------


QUOTA = "You exceeded your current token quota: <org-emulator> 0, please check your account balance"
TPD = "Your account org<ak> request reached organization TPD rate limit, current:9, limit:5"


@pytest.mark.parametrize("spec, status", [
    ({"status": 401}, 503),
    ({"status": 401, "type": "incorrect_api_key_error", "message": "Incorrect API key provided"}, 503),
    ({"status": 403}, 503),
    ({"status": 404}, 503),
    ({"status": 429, "type": "exceeded_current_quota_error", "message": QUOTA}, 503),
    ({"status": 429, "type": "rate_limit_reached_error", "message": TPD}, 503),
    ({"status": 400, "type": "content_filter", "message": "high risk"}, 400),
])
def test_hosted_errors_that_waiting_cannot_fix_are_not_retried(gateway, moonshot, spec, status):
    fault(moonshot, count=2, **spec)
    before = received(moonshot)
    response = chat(gateway, "hosted")
    assert response.status_code == status and received(moonshot) - before == 1
    assert HOSTED_KEY not in response.text


@pytest.mark.parametrize("spec", [
    {"status": 429, "type": "rate_limit_reached_error"},  # "try again after 1 seconds", no Retry-After
    {"status": 429},  # engine_overloaded_error with Retry-After: 1
    {"status": 500},
    {"status": 503},
    {"status": 504},  # the hosted API's HTML gateway time-out page
])
def test_hosted_errors_the_reference_says_to_retry_are_retried(gateway, moonshot, spec):
    fault(moonshot, count=1, **spec)
    before = received(moonshot)
    response = chat(gateway, "hosted")
    assert response.status_code == 200 and received(moonshot) - before == 2


# --- health --------------------------------------------------------------------------------------


def test_health_probes_do_not_queue_behind_a_full_data_plane_pool(gateway, sglang):
    """Two slow streams hold both data-plane connections of `kt-narrow` through two health cycles: the
    backend stays up (its probes have their own connection), so /readyz stays 200."""
    fault(sglang, delay_prefill_s=2.5 * HEALTH_CYCLE_S, count=2)
    results: list[int] = []

    def slow_stream() -> None:
        results.append(chat(gateway, "narrow", stream=True, timeout=60).status_code)
    streams = [threading.Thread(target=slow_stream) for _ in range(2)]
    for thread in streams:
        thread.start()
    base = gateway.removesuffix("/v1")
    deadline = time.monotonic() + 2 * HEALTH_CYCLE_S
    while time.monotonic() < deadline:
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        assert metric(gateway, "kimi_gateway_backend_up", backend="kt-narrow") == 1
        time.sleep(0.5)
    assert metric(gateway, "kimi_gateway_in_flight_requests", backend="kt-narrow") == 2  # still saturated
    for thread in streams:
        thread.join(60)
    assert results == [200, 200]


# --- broken answers ------------------------------------------------------------------------------


ADMIN_KEY = "admin-key-for-fault-tests"
PROXY_PAGE = "<html><head><title>400 Bad Request</title></head><body><center>nginx</center></body></html>"


@pytest.mark.parametrize("spec, stream", [
    ({"raw_body": "this is not JSON", "content_type": "application/json"}, False),  # a 200 that is not JSON
    ({"raw_body": PROXY_PAGE, "status": 400}, False),  # a proxy's page, not the client's fault
    ({"raw_body": PROXY_PAGE, "status": 200}, True),  # a stream answered with HTML
])
def test_a_broken_backend_body_is_a_502(gateway, sglang, spec, stream):
    fault(sglang, count=2, **spec)
    response = chat(gateway, "kimi-k2.5", stream=stream)
    assert response.status_code == 502 and response.json()["error"]["type"] == "server_error"
    assert "could not parse" not in response.text and "nginx" not in response.text


def test_a_proxy_page_from_the_adapter_load_is_not_the_clients_json(gateway, sglang, adapter_dir):
    """Loads happen in the lifecycle, never on the request path: a broken load answer fails the registration
    (rolled back) with the backend named, never as the client's unparseable JSON."""
    root, _ = adapter_dir
    fault(sglang, path="/load_lora_adapter", raw_body=PROXY_PAGE, status=200, count=2)
    response = httpx.post(f"{gateway.removesuffix('/v1')}/admin/adapters", timeout=60,
                          headers={"authorization": f"Bearer {ADMIN_KEY}"},
                          json={"name": "medical", "source": str(root / "medical"), "backends": ["kt"]})
    assert response.status_code == 502, response.text
    assert "could not parse" not in response.text and "nginx" not in response.text
    assert "medical" not in [m["id"] for m in httpx.get(f"{gateway}/models", timeout=10).json()["data"]]


# --- streams that fail after their first byte -----------------------------------------------------


@pytest.mark.parametrize("spec, code", [
    ({"drop_mid_stream_after": 3}, "502"),  # the connection is cut
    ({"stream_error_after": 3, "stream_error_code": 500}, "502"),  # SGLang's 5xx error event
    ({"stream_error_after": 3}, "400"),  # SGLang's in-stream 400 (a ValueError after the head)
])
def test_a_stream_failing_after_its_first_byte_ends_cleanly_and_counts_as_failed(gateway, sglang, spec, code):
    fault(sglang, **spec)
    ok_before = metric(gateway, "kimi_gateway_requests_total", route="kimi-k2.5", code="200")
    failed_before = metric(gateway, "kimi_gateway_requests_total", route="kimi-k2.5", code=code)
    response = chat(gateway, "kimi-k2.5", stream=True)
    events = [e for e in response.text.split("\n\n") if e]
    assert response.status_code == 200 and events[-1] == "data: [DONE]"
    errors = [e for e in events if e.startswith('data: {"error"')]
    assert len(errors) == 1 and errors[0] == events[-2]
    assert set(orjson.loads(errors[0][6:])["error"]) == {"message", "type", "param", "code"}
    assert metric(gateway, "kimi_gateway_requests_total", route="kimi-k2.5", code=code) == failed_before + 1
    assert metric(gateway, "kimi_gateway_requests_total", route="kimi-k2.5", code="200") == ok_before

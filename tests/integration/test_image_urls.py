"""Hostile image URLs against the real gateway process, with real image hosts on loopback.

The "public" image host is 127.0.0.3, the only network the gateway is told to trust
(`limits.private_image_networks`); the sentinel on 127.0.0.2 stays private and counts every request it
gets, which must stay zero. In fetch mode (the default) what reaches the backend is a data: URL: the
Moonshot emulator refuses anything else, as the hosted API does (reference/moonshot-api.md), and its
request log shows the bytes. In forward mode the SGLang emulator gets the re-serialised URL.
"""
from __future__ import annotations

import base64
import time
from urllib.parse import quote

import httpx
import pytest

from tests.image_hosts import IMAGES, PNG, ImageHost
from tests.integration.conftest import start_moonshot
from tests.integration.test_sglang import start_sglang

IMAGE_IP, SENTINEL_IP = "127.0.0.3", "127.0.0.2"
HOSTED_KEY = "sk-hosted-image-test-123"
MAX_IMAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def host():
    with ImageHost(IMAGE_IP) as server:
        yield server


@pytest.fixture(scope="module")
def sentinel():
    with ImageHost(SENTINEL_IP) as server:
        yield server


@pytest.fixture(scope="module")
def moonshot(start_process) -> str:
    return start_moonshot(start_process, "moonshot-images", HOSTED_KEY)


@pytest.fixture(scope="module")
def sglang(start_process) -> str:
    return start_sglang(start_process, "sglang-images")


@pytest.fixture(scope="module")
def gateway(moonshot, sglang, host, start_gateway) -> str:
    return start_gateway({
        "backends": [{"name": "hosted", "kind": "moonshot", "url": f"{moonshot}/v1", "api_key_env": "MOONSHOT_KEY",
                      "models": {"kimi-k2.5": "kimi-k2.6"}},
                     {"name": "kt", "kind": "sglang", "url": sglang}],
        "routes": [{"name": "kimi-k2.5", "targets": ["hosted"]},
                   {"name": "kimi-forward", "targets": ["kt"], "image_urls": "forward"}],
        "limits": {"private_image_networks": [f"{IMAGE_IP}/32"], "max_image_bytes": MAX_IMAGE_BYTES,
                   "image_fetch_timeout_s": 2, "image_url_ports": [host.port]},
    }, name="gateway-images", env={"MOONSHOT_KEY": HOSTED_KEY})


def chat(*urls: str, model: str = "kimi-k2.5") -> dict:
    parts = [{"type": "text", "text": "What is in these pictures?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 8}


def post(gateway: str, body: dict) -> httpx.Response:
    return httpx.post(f"{gateway}/chat/completions", json=body, timeout=30)


def last_images(emulator: str) -> list[str]:
    body = httpx.get(f"{emulator}/_emulator/requests", timeout=10).json()[-1]["body"]
    return [part["image_url"]["url"] for part in body["messages"][0]["content"] if part["type"] == "image_url"]


def data_url(path: str) -> str:
    kind, data = IMAGES[path]
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def redirect(host: ImageHost, to: str) -> str:
    return f"{host.base}/redirect?to={quote(to, safe='')}"


def test_fetch_mode_sends_the_backend_a_data_url_never_the_http_url(gateway, moonshot, host):
    url = f"{host.base}/ok.png"
    response = post(gateway, chat(url))
    assert response.status_code == 200, response.text
    assert last_images(moonshot) == [f"data:image/png;base64,{base64.b64encode(PNG).decode()}"]
    sent = httpx.get(f"{moonshot}/_emulator/requests", timeout=10).json()[-1]
    assert url not in str(sent) and host.ip not in str(sent)


def test_several_images_are_fetched_once_each_and_all_inlined(gateway, moonshot, host):
    before = len(host.hits)
    paths = ["/ok.png", "/ok.jpg", "/ok.gif", "/ok.webp", "/ok.jpg"]
    response = post(gateway, chat(*(host.base + path for path in paths)))
    assert response.status_code == 200, response.text
    assert last_images(moonshot) == [data_url(path) for path in paths]
    assert sorted(hit.path for hit in host.hits[before:]) == sorted(set(paths))


def test_a_redirect_within_public_hosts_is_followed(gateway, moonshot, host):
    response = post(gateway, chat(redirect(host, "/ok.gif")))
    assert response.status_code == 200, response.text
    assert last_images(moonshot) == [data_url("/ok.gif")]


@pytest.mark.parametrize("make_url, fragment", [
    (lambda host, sentinel: f"{sentinel.base}/x.png", "must point to public addresses"),
    (lambda host, sentinel: redirect(host, f"{sentinel.base}/x.png"), "redirected to a host that is not public"),
    (lambda host, sentinel: redirect(host, redirect(host, f"{sentinel.base}/x.png")),
     "redirected to a host that is not public"),
    (lambda host, sentinel: redirect(host, f"http://[::1]:{sentinel.port}/x.png"),
     "redirected to a host that is not public"),
    (lambda host, sentinel: redirect(host, f"http://2130706433:{sentinel.port}/x.png"), "unusual IPv4 host form"),
    (lambda host, sentinel: f"{host.base}/loop", "redirected more than 3 times"),
    (lambda host, sentinel: f"{host.base}/big.png", f"larger than the limit of {MAX_IMAGE_BYTES} bytes"),
    (lambda host, sentinel: f"{host.base}/big-chunked.png", f"larger than the limit of {MAX_IMAGE_BYTES} bytes"),
    (lambda host, sentinel: f"{host.base}/page.html", "content type that is not an image"),
    (lambda host, sentinel: f"{host.base}/fake.png", "did not return a png, jpeg, gif or webp image"),
    (lambda host, sentinel: f"{host.base}/gzip.png", "compressed (content-encoding) body"),
    (lambda host, sentinel: f"{host.base}/missing.png", "answered HTTP 404"),
])
def test_hostile_image_urls_are_a_clear_400_and_never_reach_a_private_host(gateway, moonshot, host, sentinel,
                                                                            make_url, fragment):
    asked = len(httpx.get(f"{moonshot}/_emulator/requests", timeout=10).json())
    response = post(gateway, chat(f"{host.base}/ok.png", make_url(host, sentinel)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == "messages[0].content[2].image_url"
    assert error["type"] == "invalid_request_error" and SENTINEL_IP not in error["message"]
    assert sentinel.hits == []
    assert len(httpx.get(f"{moonshot}/_emulator/requests", timeout=10).json()) == asked  # nothing was forwarded


def test_a_slow_image_host_is_cut_at_the_deadline(gateway, host):
    started = time.monotonic()
    response = post(gateway, chat(f"{host.base}/slow.png"))
    assert response.status_code == 400 and "took longer than 2 s" in response.json()["error"]["message"]
    assert time.monotonic() - started < 4


def test_forward_mode_sends_only_the_re_serialised_url(gateway, sglang, host):
    response = post(gateway, chat(f"HTTP://{host.ip}:{host.port}/ok.png#fragment", model="kimi-forward"))
    assert response.status_code == 200, response.text
    assert last_images(sglang) == [f"http://{host.ip}:{host.port}/ok.png"]


@pytest.mark.parametrize("url, fragment", [
    ("http://example.com\\@127.0.0.3/x.png", "backslash"),
    ("http://user@127.0.0.3/x.png", "userinfo"),
    ("http://0x7f.0.0.3/x.png", "unusual IPv4 host form"),
    ("http://127.0.0.3:1/x.png", "names port 1"),
    ("http://127.0.0.2/x.png", "must point to public addresses"),
])
def test_forward_mode_refuses_what_parsers_may_read_differently(gateway, sglang, url, fragment):
    response = post(gateway, chat(url, model="kimi-forward"))
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


def test_the_sentinel_counts(sentinel):
    """The zero counts above mean something: a direct request is counted."""
    assert sentinel.hits == []
    httpx.get(f"{sentinel.base}/probe", timeout=10)
    assert [hit.path for hit in sentinel.hits] == ["/probe"]

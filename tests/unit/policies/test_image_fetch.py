"""ImagePolicy in fetch mode against real local servers: the connection goes to the checked address, every
redirect hop is checked again, and size, time and type limits hold. The image host lives on 127.0.0.3 (the
only trusted network here), the sentinel on 127.0.0.2 (private): the sentinel must never be reached."""
from __future__ import annotations

import base64
import re
import ssl
import time
from urllib.parse import quote

import pytest
import trustme

from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError
from gateway.policies.content import ImagePolicy
from tests.image_hosts import BIG_BYTES, IMAGES, PNG, ImageHost

IMAGE_IP, SENTINEL_IP = "127.0.0.3", "127.0.0.2"
LIMITS = LimitsConfig(private_image_networks=(f"{IMAGE_IP}/32",), max_image_bytes=BIG_BYTES // 2,
                      image_fetch_timeout_s=1.5)


@pytest.fixture
def host():
    with ImageHost(IMAGE_IP) as server:
        yield server


@pytest.fixture
def sentinel(host):
    """A private server on the image host's port, so that only the address tells them apart."""
    with ImageHost(SENTINEL_IP, host.port) as server:
        yield server


class Resolver:
    """A DNS that answers `answers[i]` to the i-th question (the last answer from then on)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers, self.questions = answers, []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.questions.append(host)
        return self.answers[min(len(self.questions), len(self.answers)) - 1]


def doc(*urls: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}]
                          + [{"type": "image_url", "image_url": {"url": url}} for url in urls]}]}


def urls_of(body: dict) -> list[str]:
    return [part["image_url"]["url"] for part in body["messages"][0]["content"] if part["type"] == "image_url"]


async def fetch(*urls: str, resolver=None, limits: LimitsConfig = LIMITS, **kwargs) -> dict:
    body = doc(*urls)
    await ImagePolicy(limits, resolver=resolver, **kwargs).apply(body, "fetch")
    return body


async def refused(*urls: str, resolver=None, limits: LimitsConfig = LIMITS, **kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as failure:
        await fetch(*urls, resolver=resolver, limits=limits, **kwargs)
    assert failure.value.status_code == 400
    return failure.value


@pytest.mark.parametrize("path", sorted(IMAGES))
async def test_each_image_type_becomes_a_data_url(host, path):
    kind, data = IMAGES[path]
    assert urls_of(await fetch(host.base + path)) == [f"data:{kind};base64,{base64.b64encode(data).decode()}"]


async def test_a_name_is_resolved_once_and_the_connection_goes_to_that_answer(host, sentinel):
    """DNS that changes between check and fetch: a second lookup would say the sentinel."""
    dns = Resolver([IMAGE_IP], [SENTINEL_IP])
    body = await fetch(f"http://images.test:{host.port}/ok.png", resolver=dns)
    assert urls_of(body)[0].startswith("data:image/png;base64,")
    assert dns.questions == ["images.test"]
    assert [(hit.path, hit.host_header) for hit in host.hits] == [("/ok.png", f"images.test:{host.port}")]
    assert sentinel.hits == []


async def test_one_private_answer_refuses_the_name(host, sentinel):
    error = await refused(f"http://images.test:{host.port}/ok.png", resolver=Resolver([IMAGE_IP, SENTINEL_IP]))
    assert "must point to public addresses" in error.message
    assert host.hits == [] and sentinel.hits == []


async def test_every_redirect_hop_is_checked_again(host, sentinel):
    dns = Resolver([IMAGE_IP], [SENTINEL_IP])      # the redirect's name now resolves to the sentinel
    target = quote(f"http://images.test:{host.port}/ok.png", safe="")
    error = await refused(f"http://images.test:{host.port}/redirect?to={target}", resolver=dns)
    assert "redirected to a host that is not public" in error.message
    assert dns.questions == ["images.test", "images.test"]
    assert SENTINEL_IP not in error.message and sentinel.hits == []


@pytest.mark.parametrize("location", [f"http://{SENTINEL_IP}:PORT/x.png", "http://[::1]:PORT/x.png",
                                      "http://169.254.169.254/latest/meta-data/", "http://2130706433/",
                                      "file:///etc/passwd", "http://a\\@127.0.0.2/"])
async def test_redirects_to_private_or_odd_targets_are_refused(host, sentinel, location):
    path = "/redirect?to=" + quote(location.replace("PORT", str(host.port)), safe="")
    error = await refused(host.base + path)
    assert "redirected" in error.message and SENTINEL_IP not in error.message
    assert sentinel.hits == [] and [hit.path for hit in host.hits] == [path]


async def test_a_good_redirect_is_followed_but_not_forever(host):
    body = await fetch(f"{host.base}/redirect?to=/ok.png")
    assert urls_of(body)[0].startswith("data:image/png;base64,")
    error = await refused(f"{host.base}/loop")
    assert "redirected more than 3 times" in error.message
    assert len([hit for hit in host.hits if hit.path == "/loop"]) == 4


@pytest.mark.parametrize("path, message", [
    ("/big.png", f"larger than the limit of {BIG_BYTES // 2} bytes"),
    ("/big-chunked.png", f"larger than the limit of {BIG_BYTES // 2} bytes"),
    ("/page.html", "content type that is not an image"),
    ("/fake.png", "did not return a png, jpeg, gif or webp image"),
    ("/gzip.png", "compressed (content-encoding) body"),
    ("/missing.png", "answered HTTP 404"),
])
async def test_bad_answers_are_refused_by_name(host, path, message):
    error = await refused(f"{host.base}/ok.png", f"{host.base}{path}")
    assert message in error.message
    assert error.param == "messages[0].content[2].image_url"


async def test_the_deadline_covers_the_whole_fetch(host):
    started = time.monotonic()
    error = await refused(f"{host.base}/slow.png")
    assert "took longer than 1.5 s" in error.message
    assert time.monotonic() - started < 3


async def test_images_are_fetched_concurrently_and_once_per_url(host):
    slow_limits = LIMITS.model_copy(update={"image_fetch_timeout_s": 10.0})
    paths = ["/ok.png", "/ok.jpg", "/ok.gif", "/ok.webp", "/ok.png"]
    body = await fetch(*(host.base + path for path in paths), limits=slow_limits)
    assert [url.split(";")[0] for url in urls_of(body)] == [f"data:{IMAGES[p][0]}" for p in paths]
    assert sorted(hit.path for hit in host.hits) == sorted(set(paths))


async def test_too_many_image_urls_are_refused_before_any_fetch(host):
    error = await refused(*(f"{host.base}/ok.png?{i}" for i in range(3)),
                          limits=LIMITS.model_copy(update={"max_image_urls": 2}))
    assert "3 http(s) image URLs; the limit is 2" in error.message and host.hits == []


async def test_private_addresses_are_refused_without_a_connection(sentinel):
    for url in (f"http://{SENTINEL_IP}:{sentinel.port}/x.png", f"http://[::1]:{sentinel.port}/x.png"):
        error = await refused(url)
        assert "must point to public addresses" in error.message
    assert sentinel.hits == []


@pytest.fixture(scope="module")
def tls_ca():
    return trustme.CA()


def tls_host(ca: trustme.CA, name: str) -> ImageHost:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return ImageHost(IMAGE_IP, tls=context)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_sends_the_name_as_sni_and_checks_the_certificate_for_it(tls_ca):
    with tls_host(tls_ca, "images.test") as host:
        url = f"https://images.test:{host.port}/ok.png"
        body = await fetch(url, resolver=Resolver([IMAGE_IP]), ssl_context=client_context(tls_ca))
        assert urls_of(body)[0] == f"data:image/png;base64,{base64.b64encode(PNG).decode()}"
        assert [(hit.sni, hit.host_header) for hit in host.hits] == [("images.test", f"images.test:{host.port}")]


async def test_https_to_a_host_whose_certificate_names_another_is_refused(tls_ca):
    with tls_host(tls_ca, "other.test") as host:
        error = await refused(f"https://images.test:{host.port}/ok.png", resolver=Resolver([IMAGE_IP]),
                              ssl_context=client_context(tls_ca))
        assert re.search(r"could not be reached \(connection or TLS failure\)", error.message)
        assert host.hits == []

"""Property: whenever the gateway accepts an image URL in forward mode, urllib3, httpx and yarl (aiohttp's URL
type) all read the same host and port from it, and from the URL the gateway re-serialises, and that host is
public. The URLs are built from the pieces SSRF write-ups use to make parsers disagree."""
from __future__ import annotations

import ipaddress

import httpx
import pytest
import urllib3.util
import yarl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError
from gateway.policies.content import ImagePolicy
from gateway.policies.image_url import is_public

# A fake DNS: names on the left resolve to public addresses, internal.example to a private one.
DNS = {"example.com": ["93.184.215.14"], "images.example.org": ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
       "xn--bcher-kva.example": ["93.184.215.15"], "a_b.example.com": ["93.184.215.16"],
       "internal.example": ["10.0.0.7"], "rebind.example": ["93.184.215.17", "127.0.0.1"]}


async def fake_resolver(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("NXDOMAIN")
    return DNS[host]


SCHEMES = st.sampled_from(["http", "https", "HTTP", "hTtPs", " http", "http\t", "ftp", "javascript"])
SEPARATORS = st.sampled_from(["://", ":/", ":///", ":\\\\", "://\\", ":", "://@", "://\n", ":／／"])
USERINFO = st.sampled_from(["", "", "", "user@", "a:b@", "@", "example.com@", "127.0.0.1@", "x%40y@",
                            "example.com:80@", "[::1]@"])
HOSTS = st.sampled_from([
    "example.com", "EXAMPLE.com", "images.example.org", "xn--bcher-kva.example", "a_b.example.com",
    "internal.example", "rebind.example", "localhost", "example.com.", "example..com", "-x.example.com",
    "8.8.8.8", "93.184.215.14", "127.0.0.1", "0.0.0.0", "169.254.169.254", "10.0.0.1", "2130706433",
    "0177.0.0.1", "0x7f.1", "0x7f000001", "127.1", "127.0.1", "017700000001", "1.1.1.1.", "08.8.8.8",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:1]", "[2606:4700::1111]",
    "[2606:4700:0::1111]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::7f00:1]", "[fe80::1%25eth0]",
    "[fec0::1]", "[2606:4700::1111", "exa%6dple.com", "%31%32%37.0.0.1", "ｅxample.com", "127。0。0。1",
    "bücher.example", "xn--zz.example", "ab--c.example", "example.com\x00.evil", "example.com%00",
    "example.com\\.evil", "example.com#.evil", "example.com?.evil", "example.com;.evil", "",
])
PORTS = st.sampled_from(["", "", "", ":80", ":443", ":8080", ":", ":0", ":080", ":65535", ":65536", ":-1",
                         ":80:80", ":8o", ":\u0661"])
PATHS = st.sampled_from(["/x.png", "", "/", "?q=1", "#frag", "/a\\b", "\\@evil.com/", "#@evil.com/",
                         "?@127.0.0.1/", "/@127.0.0.1/", "/%2e%2e/x", "/%zz", "/ x", "/x\r\nHost: evil",
                         "//127.0.0.1/", "/é.png", "/?a=%", "@127.0.0.1"])
NOISE = st.text(alphabet=st.sampled_from(list("@:/\\?#[]%.\t\n\r \x00\x7f") + ["％", "＠", "。", "ı"]),
                max_size=2)


@st.composite
def hostile_urls(draw) -> str:
    url = (draw(SCHEMES) + draw(SEPARATORS) + draw(USERINFO) + draw(HOSTS) + draw(PORTS) + draw(PATHS))
    noise = draw(NOISE)
    at = draw(st.integers(0, len(url)))
    return url[:at] + noise + url[at:]


def parsed_hosts(url: str) -> set[tuple[object, int]]:
    """(host, port) as each parser reads it; IP literals as ipaddress objects, names as lower-case ASCII."""
    u3 = urllib3.util.parse_url(url)
    hx = httpx.URL(url)
    yl = yarl.URL(url)
    default = 443 if hx.scheme == "https" else 80
    readings = {(u3.host, u3.port or default), (hx.raw_host.decode("ascii"), hx.port or default),
                (yl.raw_host, yl.port or default)}
    return {(normalise(host), port) for host, port in readings}


def normalise(host: str | None) -> object:
    host = (host or "").strip("[]").lower()
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host


def host_is_public(host: str) -> bool:
    try:
        return is_public(host)
    except ValueError:
        return all(is_public(address) for address in DNS[host])


async def accepted_in_forward_mode(url: str) -> str | None:
    """The URL the gateway forwards, or None if it refuses."""
    policy = ImagePolicy(LimitsConfig(image_url_ports=(8080,)), resolver=fake_resolver)
    doc = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    try:
        await policy.apply(doc, "forward")
    except InvalidRequestError:
        return None
    return doc["messages"][0]["content"][0]["image_url"]["url"]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_urls())
@example("http://example.com/x.png")
@example("https://[2606:4700::1111]:8080/x")
@example("http://xn--bcher-kva.example/")
async def test_an_accepted_url_means_one_public_host_to_every_parser(url):
    forwarded = await accepted_in_forward_mode(url)
    if forwarded is None:
        return
    for form in (url, forwarded):
        readings = parsed_hosts(form)
        assert len(readings) == 1, (form, readings)
    (host, port), = parsed_hosts(forwarded)
    assert parsed_hosts(url) == parsed_hosts(forwarded)
    assert host_is_public(str(host)), url
    assert port in (80, 443, 8080)


@pytest.mark.parametrize("url", ["http://example.com/x.png", "HTTPS://Example.COM:443/a?b#c",
                                 "http://[2606:4700:0::1111]:8080/", "http://xn--bcher-kva.example/i.png"])
async def test_ordinary_urls_are_accepted(url):
    """The property above must not hold vacuously: ordinary public URLs pass."""
    assert await accepted_in_forward_mode(url) is not None

"""parse_image_url (the strict reading shared by both modes), is_public, and forward mode's rewrite."""
from __future__ import annotations

import re

import pytest

from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError
from gateway.policies.content import ImagePolicy
from gateway.policies.image_url import ImageRefused, is_public, parse_image_url


@pytest.mark.parametrize("url, serialised", [
    ("http://example.com/a.png", "http://example.com/a.png"),
    ("HTTPS://Example.COM:443/x?y=1#frag", "https://example.com/x?y=1"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com?q", "http://example.com/?q"),
    ("http://example.com:80/%41", "http://example.com/%41"),
    ("https://[2606:4700:0::1111]:8443/a", "https://[2606:4700::1111]:8443/a"),
    ("http://xn--bcher-kva.example/i.png", "http://xn--bcher-kva.example/i.png"),
    ("http://8.8.8.8/x", "http://8.8.8.8/x"),
])
def test_accepted_urls_are_re_serialised_from_their_parts(url, serialised):
    assert str(parse_image_url(url)) == serialised


@pytest.mark.parametrize("url, message", [
    ("http://evil.com\\@127.0.0.1/", "backslash"),
    ("http://example.com/a\\b", "backslash"),
    ("http://user@example.com/", "userinfo"),
    ("http://example.com:80@127.0.0.1/", "userinfo"),
    ("http://exa\tmple.com/", "whitespace or control"),
    ("http://example.com/x\r\nHost: evil", "whitespace or control"),
    (" http://example.com/", "whitespace or control"),
    ("http://exa%6dple.com/", "percent-encoded host"),
    ("http://%31%32%37.0.0.1/", "percent-encoded host"),
    ("http://[fe80::1%25eth0]/", "percent-encoded host"),
    ("http://2130706433/", "unusual IPv4 host form"),
    ("http://0177.0.0.1/", "unusual IPv4 host form"),
    ("http://0x7f.1/", "unusual IPv4 host form"),
    ("http://0x7f000001/", "unusual IPv4 host form"),
    ("http://127.1/", "unusual IPv4 host form"),
    ("http://08.8.8.8/", "unusual IPv4 host form"),
    ("http://example.123/", "unusual IPv4 host form"),
    ("http://[::ffff:127.0.0.1]/", "unusual IPv6 host form"),
    ("http://[::ffff:7f00:1]/", "embeds an IPv4 address"),
    ("http://[64:ff9b::7f00:1]/", "embeds an IPv4 address"),
    ("http://[2002:7f00:1::1]/", "embeds an IPv4 address"),
    ("http://[::7f00:1]/", "embeds an IPv4 address"),
    ("http://[2606:4700::1111/", "malformed IPv6"),
    ("http://ｅxample.com/", "non-ASCII"),
    ("http://127。0。0。1/", "non-ASCII"),
    ("http://xn--zz.example/", "IDNA (xn--) label"),
    ("http://ab--cd.example/", "IDNA (xn--) label"),
    ("http://localhost/", "fully qualified domain name"),
    ("http://example.com./", "ends with a dot"),
    ("http://-x.example.com/", "not a valid domain name"),
    ("http://example..com/", "not a valid domain name"),
    ("http:///x.png", "no host"),
    ("http:/example.com/", "must start with http:// or https://"),
    ("http://example.com:/", "invalid port"),
    ("http://example.com:0080/", "invalid port"),
    ("http://example.com:65536/", "invalid port"),
    ("http://example.com/%zz", "malformed percent-escape"),
    ("http://example.com/" + "a" * 5000, "longer than 4096"),
])
def test_forms_parsers_disagree_on_are_refused(url, message):
    with pytest.raises(ImageRefused, match=re.escape(message)):
        parse_image_url(url)


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("fe80::1%eth0", False),
    ("2606:4700::1111", True), ("0.0.0.0", False), ("224.0.0.1", False), ("64:ff9b::a00:1", False),
    ("64:ff9b::808:808", True), ("2002:a00:1::1", False), ("::7f00:1", False), ("fec0::1", False),
    ("ff02::1", False),
])
def test_is_public(address, public):
    assert is_public(address) is public


def image_doc(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


async def public_dns(host: str, port: int) -> list[str]:
    return {"example.com": ["93.184.215.14"], "internal.example.com": ["10.0.0.7"]}[host]


async def forward(url: str, **limits) -> str:
    doc = image_doc(url)
    await ImagePolicy(LimitsConfig(**limits), resolver=public_dns).apply(doc, "forward")
    return doc["messages"][0]["content"][0]["image_url"]["url"]


async def test_forward_sends_the_re_serialised_url():
    assert await forward("HTTP://EXAMPLE.com:80/a.png#x") == "http://example.com/a.png"


async def test_forward_checks_the_name_s_addresses():
    with pytest.raises(InvalidRequestError, match="must point to public addresses") as refused:
        await forward("http://internal.example.com/a.png")
    assert refused.value.param == "messages[0].content[0].image_url"
    assert "10.0.0.7" not in refused.value.message


async def test_forward_allows_only_configured_ports():
    with pytest.raises(InvalidRequestError, match="names port 8080"):
        await forward("http://example.com:8080/a.png")
    assert await forward("http://example.com:8080/a.png", image_url_ports=(8080,)) == "http://example.com:8080/a.png"
    assert await forward("https://example.com:443/a.png") == "https://example.com/a.png"

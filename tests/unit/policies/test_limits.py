"""Per-key rate limits and the image-URL policy."""
import re

import pytest

from gateway.auth import Principal
from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError, RateLimitedError
from gateway.policies import ratelimit
from gateway.policies.content import ImagePolicy
from gateway.policies.ratelimit import RateLimiter


async def test_rpm_refuses_then_refills(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: now[0])
    limiter, key = RateLimiter(), Principal("k", ("*",), rpm=2)
    await limiter.admit(key, 100, 10)
    await limiter.admit(key, 100, 10)
    with pytest.raises(RateLimitedError) as refused:
        await limiter.admit(key, 100, 10)
    assert refused.value.headers["retry-after"] == "30"
    now[0] += 30
    await limiter.admit(key, 100, 10)


async def test_tpm_charges_prompt_estimate_plus_max_tokens(monkeypatch):
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: 5.0)
    limiter, key = RateLimiter(), Principal("k", ("*",), tpm=1000)
    await limiter.admit(key, 400, 800)          # 100 + 800 = 900 tokens
    with pytest.raises(RateLimitedError, match="tokens per minute"):
        await limiter.admit(key, 400, 200)      # 300 more would exceed 1000
    await limiter.admit(Principal("other", ("*",), tpm=1000), 400, 800)  # budgets are per key


async def test_keys_without_limits_are_never_counted():
    limiter = RateLimiter()
    for _ in range(1000):
        await limiter.admit(Principal("k", ("*",)), 10**6, 10**6)


def image_doc(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.mark.parametrize("url, message", [
    ("file:///etc/passwd", "only data: and http(s)"),
    ("gopher://x/", "only data: and http(s)"),
    ("http://localhost/x.png", "fully qualified domain name"),
    ("http://2130706433/x.png", "unusual IPv4 host form"),      # 127.0.0.1 written as a number
    ("http://[::1]/x.png", "public addresses"),
    ("http://127.0.0.1/x.png", "public addresses"),
    ("data:image/png;base64," + "A" * 200, "data URL is"),
])
@pytest.mark.parametrize("mode", ["fetch", "forward"])
async def test_image_urls_refused(url, message, mode):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        await ImagePolicy(LimitsConfig(max_data_url_bytes=100)).apply(image_doc(url), mode)


async def test_allowed_images_pass():
    await ImagePolicy(LimitsConfig()).apply(image_doc("data:image/png;base64,AAAA"), "fetch")
    doc = image_doc("http://127.0.0.1/x.png")
    await ImagePolicy(LimitsConfig(allow_private_image_urls=True)).apply(doc, "forward")
    assert doc["messages"][0]["content"][0]["image_url"]["url"] == "http://127.0.0.1/x.png"

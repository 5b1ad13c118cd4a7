"""check_content(): limits on what a request may carry (message count, max_tokens, image URLs).

Image URLs matter because backends fetch them on the gateway's behalf: only `data:` URLs (size-limited)
and http(s) URLs to public addresses pass; `file://` and friends never do, and private, loopback and
link-local targets (169.254.169.254 is the cloud metadata service) are refused unless allowed by config.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError

DNS_TIMEOUT_S = 2.0


def check_limits(doc: dict, limits: LimitsConfig) -> None:
    messages = doc.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise InvalidRequestError(f"Too many messages: {len(messages)} (the limit is {limits.max_messages}).",
                                  param="messages")
    for field in ("max_tokens", "max_completion_tokens"):
        value = doc.get(field)
        if isinstance(value, int) and value > limits.max_tokens:
            raise InvalidRequestError(f"'{field}' is {value}; the limit is {limits.max_tokens}.", param=field)


def image_urls(doc: dict):
    for index, message in enumerate(doc.get("messages") or ()):
        content = message.get("content")
        if isinstance(content, list):
            for position, part in enumerate(content):
                if part.get("type") == "image_url":
                    yield f"messages[{index}].content[{position}].image_url", part["image_url"]["url"]


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolves_public(host: str) -> bool:
    """Every address the name resolves to must be public: one private answer is enough to refuse."""
    try:
        return is_public(host)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), DNS_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return False
    return bool(infos) and all(is_public(info[4][0]) for info in infos)


async def check_image_urls(doc: dict, limits: LimitsConfig) -> None:
    for where, url in image_urls(doc):
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            if len(url) > limits.max_data_url_bytes:
                raise InvalidRequestError(f"{where}: the data URL is {len(url)} bytes; the limit is "
                                          f"{limits.max_data_url_bytes}.", param=where)
            continue
        if scheme not in ("http", "https"):
            raise InvalidRequestError(f"{where}: only data: and http(s) image URLs are accepted.", param=where)
        host = urlsplit(url).hostname
        if not host:
            raise InvalidRequestError(f"{where}: the image URL has no host.", param=where)
        if not limits.allow_private_image_urls and not await resolves_public(host):
            raise InvalidRequestError(f"{where}: image URLs must point to public addresses "
                                      "(private, loopback and link-local hosts are refused).", param=where)

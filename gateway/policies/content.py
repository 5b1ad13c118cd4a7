"""check_limits() and ImagePolicy: limits on what a request may carry (message count, max_tokens, images).

Only `data:` URLs (size-limited) and http(s) URLs pass as images; `file://` and friends never do. What
happens to an http(s) URL is the route's `image_urls` mode (`limits.image_urls` unless the route says):
- `fetch` (the default): the gateway downloads it (image_fetch.py: pinned to the checked address, redirects
  re-checked, size, time and type limits) and forwards a `data:` URL, so no backend ever fetches anything;
  this is also the only form the hosted API takes (reference/moonshot-api.md "Images and video");
- `forward`: the URL is parsed strictly (image_url.py), its host must resolve to permitted addresses, and
  only the re-serialised URL goes on; non-default ports need `limits.image_url_ports`. The backend resolves
  the name again, so this mode trusts the backend's DNS; it is opt-in per route.
Requests without image parts never reach this module (validation.check_request says whether there are any).
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

from gateway.config import LimitsConfig
from gateway.errors import InvalidRequestError
from gateway.policies.image_fetch import ImageFetcher
from gateway.policies.image_url import AddressPolicy, ImageRefused, ImageURL, Resolver, parse_image_url


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """The two limits check_limits() reads, copied out of LimitsConfig once for the data plane: each read of
    a pydantic model's field costs about 1.5k instructions (gateway/policies/sampling.py plan())."""
    max_messages: int
    max_tokens: int


def check_limits(doc: dict, limits: LimitsConfig | MessageLimits) -> None:
    messages = doc.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise InvalidRequestError(f"Too many messages: {len(messages)} (the limit is {limits.max_messages}).",
                                  param="messages")
    for field in ("max_tokens", "max_completion_tokens"):
        value = doc.get(field)
        if isinstance(value, int) and value > limits.max_tokens:
            raise InvalidRequestError(f"'{field}' is {value}; the limit is {limits.max_tokens}.", param=field)


def image_parts(doc: dict) -> Iterator[tuple[str, dict]]:
    """(param path, the `image_url` object) for each image part; check_request has vouched for the shape."""
    for index, message in enumerate(doc.get("messages") or ()):
        content = message.get("content")
        if isinstance(content, list):
            for position, part in enumerate(content):
                if part.get("type") == "image_url":
                    yield f"messages[{index}].content[{position}].image_url", part["image_url"]


class ImagePolicy:
    """Checks a request's image URLs and rewrites them in place for the backend, per the route's mode."""

    def __init__(self, limits: LimitsConfig, resolver: Resolver | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.addresses = AddressPolicy(limits.allow_private_image_urls, limits.private_image_networks, resolver)
        self.fetcher = ImageFetcher(self.addresses, limits.max_image_bytes, limits.image_fetch_redirects,
                                    ssl_context)
        self.ports = frozenset(limits.image_url_ports)

    async def apply(self, doc: dict, mode: str) -> None:
        remote = self.remote_images(doc)
        if not remote:
            return
        prepare = self.forward if mode == "forward" else self.fetcher.fetch
        groups: dict[str, tuple[ImageURL, list[tuple[str, dict]]]] = {}
        for where, image, url in remote:          # the same URL twice in one request is fetched once
            groups.setdefault(str(url), (url, []))[1].append((where, image))
        jobs = [(refs, url, prepare) for url, refs in groups.values()]
        await run_bounded(jobs, self.limits.image_fetch_concurrency, self.limits.image_fetch_timeout_s)

    def remote_images(self, doc: dict) -> list[tuple[str, dict, ImageURL]]:
        """Checks data: URLs on the spot; returns the http(s) ones, parsed."""
        remote = []
        for where, image in image_parts(doc):
            url = image["url"]
            scheme = url.partition(":")[0].lower() if ":" in url else ""
            if scheme == "data":
                if len(url) > self.limits.max_data_url_bytes:
                    raise InvalidRequestError(f"{where}: the data URL is {len(url)} bytes; the limit is "
                                              f"{self.limits.max_data_url_bytes}.", param=where)
            elif scheme not in ("http", "https"):
                raise InvalidRequestError(f"{where}: only data: and http(s) image URLs are accepted.", param=where)
            else:
                remote.append((where, image, parse_at(where, url)))
        if len(remote) > self.limits.max_image_urls:
            raise InvalidRequestError(f"The request has {len(remote)} http(s) image URLs; the limit is "
                                      f"{self.limits.max_image_urls}.", param="messages")
        return remote

    async def forward(self, url: ImageURL) -> str:
        if url.explicit_port and url.port not in self.ports:
            raise ImageRefused(f"the image URL names port {url.port}; only the scheme's default port is "
                               "allowed (see limits.image_url_ports).")
        await self.addresses.check(url)
        return str(url)


def parse_at(where: str, url: str) -> ImageURL:
    try:
        return parse_image_url(url)
    except ImageRefused as refused:
        raise InvalidRequestError(f"{where}: {refused}", param=where) from None


Job = tuple[list[tuple[str, dict]], ImageURL, Callable[[ImageURL], Awaitable[str]]]


async def run_bounded(jobs: list[Job], concurrency: int, timeout_s: float) -> None:
    """Run each job (at most `concurrency` at once, all within `timeout_s`) and put its result in every
    image part that named its URL; the first refusal cancels the rest and becomes the client's 400."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    gate = asyncio.Semaphore(concurrency)

    async def run(refs: list[tuple[str, dict]], url: ImageURL, prepare) -> None:
        where = refs[0][0]
        try:
            async with gate, asyncio.timeout_at(deadline):
                result = await prepare(url)
        except TimeoutError:
            raise InvalidRequestError(f"{where}: the image URL took longer than {timeout_s:g} s to handle.",
                                      param=where) from None
        except ImageRefused as refused:
            raise InvalidRequestError(f"{where}: {refused}", param=where) from None
        for _, image in refs:
            image["url"] = result

    if len(jobs) == 1:
        return await run(*jobs[0])
    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(run(*job))
    except* InvalidRequestError as refused:
        raise refused.exceptions[0] from None

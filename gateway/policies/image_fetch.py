"""ImageFetcher: the gateway downloads a client's http(s) image itself and hands back a `data:` URL.

Why the gateway and not the backend: a backend that fetches resolves DNS again and follows redirects after
the gateway checked the URL, so a rebinding name or a redirect reaches private addresses. Here every hop is
resolved once, every answer must pass the AddressPolicy, and the connection goes to that checked address
(the URL's host only travels as the Host header and the TLS SNI/certificate name, never to a resolver).
Redirects are followed by hand, each hop checked again, at most `limits.image_fetch_redirects` of them.
The body is read in chunks and dropped past `limits.max_image_bytes`; only png, jpeg, gif and webp pass,
by content type and by magic bytes; the caller's deadline covers DNS, connects, redirects and body.

Built on httpx (already the hosted driver's client, so no new dependency): a request to the IP with an
explicit Host header and the `sni_hostname` extension pins the connection without a custom resolver, and
a fresh keep-alive-free transport per image means no connection is ever shared between two host names.
"""
from __future__ import annotations

import base64
import ssl
from urllib.parse import urljoin

import httpx

from gateway.policies.image_url import (NOT_PUBLIC, AddressPolicy, AddressRefused, ImageRefused, ImageURL, IPAddress,
                                        parse_image_url)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CONTENT_TYPES = {"image/png": "image/png", "image/jpeg": "image/jpeg", "image/jpg": "image/jpeg",
                 "image/gif": "image/gif", "image/webp": "image/webp"}
ACCEPT = "image/png, image/jpeg, image/gif, image/webp"
NO_POOL = httpx.Limits(max_connections=4, max_keepalive_connections=0)
PLAIN = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # http hops: never used for TLS (and would verify if it were)


def sniff(head: bytes) -> str | None:
    """The image type the bytes say they are."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


class ImageFetcher:
    def __init__(self, addresses: AddressPolicy, max_bytes: int, max_redirects: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.addresses = addresses
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self._ssl_context = ssl_context

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # ~30 ms to build: once, and only when an https image arrives
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def fetch(self, url: ImageURL) -> str:
        """Download `url` (following checked redirects) and return it as a base64 `data:` URL.
        The caller bounds the time (asyncio.timeout)."""
        for hop in range(self.max_redirects + 1):
            try:
                addresses = await self.addresses.check(url)
            except AddressRefused:
                if hop == 0:
                    raise
                raise AddressRefused(f"the image URL redirected to a host that is not public {NOT_PUBLIC}.") from None
            # A transport per hop, without keep-alive: no connection outlives the Host/SNI it was checked for.
            verify = self.ssl_context if url.scheme == "https" else PLAIN
            async with httpx.AsyncHTTPTransport(verify=verify, limits=NO_POOL, trust_env=False) as transport:
                response = await self.open(transport, url, addresses)
                try:
                    location = redirect_location(response)
                    if location is None:
                        return await self.read_image(response)
                finally:
                    await response.aclose()
            url = next_hop(url, location)
        raise ImageRefused(f"the image URL redirected more than {self.max_redirects} times.")

    async def open(self, transport: httpx.AsyncHTTPTransport, url: ImageURL,
                   addresses: list[IPAddress]) -> httpx.Response:
        """Connect to the checked addresses in order, never to anything a resolver says later."""
        for address in addresses:
            request = httpx.Request("GET", httpx.URL(scheme=url.scheme, host=str(address), port=url.port,
                                                     raw_path=url.target.encode("ascii")),
                                    headers=[("Host", url.authority), ("Accept", ACCEPT),
                                             ("Accept-Encoding", "identity"), ("User-Agent", "kimi-gateway")],
                                    extensions={"sni_hostname": url.host} if url.address is None else {})
            try:
                return await transport.handle_async_request(request)
            except httpx.ConnectError:
                continue
            except httpx.TransportError:
                break
        raise ImageRefused("the image host could not be reached (connection or TLS failure).")

    async def read_image(self, response: httpx.Response) -> str:
        if response.status_code != 200:
            raise ImageRefused(f"the image URL answered HTTP {response.status_code}.")
        declared = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if declared not in CONTENT_TYPES:
            raise ImageRefused("the image URL returned a content type that is not an image "
                               "(png, jpeg, gif or webp are accepted).")
        if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise ImageRefused("the image URL returned a compressed (content-encoding) body; it is refused.")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageRefused(f"the image is larger than the limit of {self.max_bytes} bytes.")
        body = await self.read_limited(response)
        kind = sniff(body[:16])
        if kind is None:
            raise ImageRefused("the image URL did not return a png, jpeg, gif or webp image.")
        return f"data:{kind};base64,{base64.b64encode(body).decode('ascii')}"

    async def read_limited(self, response: httpx.Response) -> bytes:
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.max_bytes:
                    raise ImageRefused(f"the image is larger than the limit of {self.max_bytes} bytes.")
        except httpx.TransportError:
            raise ImageRefused("the image host broke off the download.") from None
        return bytes(body)


def redirect_location(response: httpx.Response) -> str | None:
    if response.status_code not in REDIRECTS:
        return None
    location = response.headers.get("location")
    if not location:
        raise ImageRefused(f"the image URL answered HTTP {response.status_code} without a location.")
    return location


def next_hop(current: ImageURL, location: str) -> ImageURL:
    """The redirect target, joined to the current URL and read by the same strict parser."""
    try:
        return parse_image_url(urljoin(str(current), location))
    except ImageRefused as refused:
        raise ImageRefused(f"the image URL redirected to a URL that is refused: {refused}") from None
    except ValueError:
        raise ImageRefused("the image URL redirected to a malformed URL.") from None

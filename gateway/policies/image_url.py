"""parse_image_url(): the one strict reading of a client's http(s) image URL; AddressPolicy: where it may lead.

Server-side request forgery hides in the gaps between URL parsers: `http://evil.com\\@127.0.0.1/`, `0x7f.1`,
`[::ffff:127.0.0.1]`, `exa%6dple.com`. Rather than guess how a backend's parser reads such a URL, anything
that parsers may read differently is refused, and what is accepted is re-serialised from the parsed parts
(tests/unit/policies/test_image_url_parsers.py checks the gateway's host against urllib3, httpx and yarl).
Refusal reasons quote only what the client sent, never a resolved address.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import idna

MAX_URL_CHARS = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}
LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
DECIMAL_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")        # WHATWG reads a host ending in one of these as IPv4
PORT = re.compile(r"[1-9][0-9]{0,4}")
PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
IPV6_CHARS = re.compile(r"[0-9a-f:]+")
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
SITE_LOCAL = ipaddress.ip_network("fec0::/10")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]
DNS_TIMEOUT_S = 2.0
NOT_PUBLIC = "(private, loopback and link-local hosts are refused)"


class ImageRefused(Exception):
    """An image URL (or what it led to) that the gateway will not pass on; the text is safe to show."""


@dataclass(frozen=True, slots=True)
class ImageURL:
    scheme: str                      # "http" or "https"
    host: str                        # lower-case name, dotted quad, or compressed IPv6 (no brackets)
    port: int                        # the effective port
    target: str                      # path and query, starting with "/"
    address: IPAddress | None        # the host when it is an IP literal

    @property
    def explicit_port(self) -> bool:
        return self.port != DEFAULT_PORTS[self.scheme]

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


def parse_image_url(url: str) -> ImageURL:
    """Parse an http(s) URL, refusing every form that URL parsers disagree on."""
    if len(url) > MAX_URL_CHARS:
        raise ImageRefused(f"the image URL is longer than {MAX_URL_CHARS} characters.")
    if not url.isascii():
        raise ImageRefused("the image URL has non-ASCII characters (send hosts as xn-- punycode and "
                           "percent-encode the path).")
    if any(char <= " " or char == "\x7f" for char in url):
        raise ImageRefused("the image URL has whitespace or control characters.")
    if "\\" in url:
        raise ImageRefused("the image URL has a backslash.")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in DEFAULT_PORTS:
        raise ImageRefused("the image URL must start with http:// or https://.")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    host, port = split_authority(rest[:end], DEFAULT_PORTS[scheme])
    address = parse_ipv6(host[1:-1]) if host.startswith("[") else None
    if address is None:
        host = host.lower()
        address = parse_ipv4(host)
        if address is None:
            check_name(host)
    return ImageURL(scheme, str(address) if address else host, port, parse_target(rest[end:]), address)


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    if "@" in authority:
        raise ImageRefused("the image URL has userinfo (user@); it is not allowed.")
    if "%" in authority:
        raise ImageRefused("the image URL has a percent-encoded host; it is not allowed.")
    if authority.startswith("["):
        host, bracket, after = authority.partition("]")
        host += bracket
        if not bracket or (after and not after.startswith(":")):
            raise ImageRefused("the image URL has a malformed IPv6 host.")
        port_text, has_port = after[1:], bool(after)
    else:
        host, colon, port_text = authority.partition(":")
        has_port = bool(colon)
    if not host:
        raise ImageRefused("the image URL has no host.")
    if not has_port:
        return host, default_port
    if not PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ImageRefused("the image URL has an invalid port.")
    return host, int(port_text)


def parse_ipv6(text: str) -> ipaddress.IPv6Address:
    """Only plain hex IPv6 literals, and none that embed an IPv4 address (mapped, compatible, 6to4, NAT64)."""
    if not IPV6_CHARS.fullmatch(text.lower()):
        raise ImageRefused("the image URL has an unusual IPv6 host form.")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise ImageRefused("the image URL has a malformed IPv6 host.") from None
    if embedded_ipv4(address) is not None or (address in IPV4_COMPATIBLE and int(address) > 1):
        raise ImageRefused("the image URL has an IPv6 host that embeds an IPv4 address; it is not allowed.")
    return address


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """A host ending in a numeric label must be a plain dotted quad (no 2130706433, 0177.0.0.1, 0x7f.1, 127.1)."""
    labels = host.split(".")
    if not NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    if len(labels) != 4 or not all(DECIMAL_OCTET.fullmatch(label) and int(label) < 256 for label in labels):
        raise ImageRefused("the image URL has an unusual IPv4 host form (only dotted decimal a.b.c.d is accepted).")
    return ipaddress.IPv4Address(host)


def check_name(host: str) -> None:
    """A fully qualified DNS name: LDH labels (and _), no trailing dot, valid xn-- labels."""
    if host.endswith("."):
        raise ImageRefused("the image URL host ends with a dot; it is not allowed.")
    labels = host.split(".")
    if len(labels) < 2 or len(host) > 253:
        raise ImageRefused("the image URL host must be a fully qualified domain name.")
    for label in labels:
        if not LABEL.fullmatch(label):
            raise ImageRefused("the image URL host is not a valid domain name.")
        if label[2:4] == "--" and not valid_punycode(label):
            raise ImageRefused("the image URL host has an invalid or reserved IDNA (xn--) label.")


def valid_punycode(label: str) -> bool:
    """An `xn--` label must decode under IDNA 2008 and encode back to itself; other `??--` labels are reserved."""
    if not label.startswith("xn--"):
        return False
    try:
        return idna.encode(idna.decode(label)).decode("ascii") == label
    except (idna.IDNAError, UnicodeError):
        return False


def parse_target(target: str) -> str:
    """Path and query as sent (the fragment is never sent); percent escapes must be well-formed."""
    target = target.partition("#")[0]
    if PERCENT.search(target):
        raise ImageRefused("the image URL has a malformed percent-escape.")
    return target if target.startswith("/") else "/" + target


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: str | IPAddress) -> bool:
    """Globally routable unicast; an IPv6 address that carries an IPv4 one is judged by that one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in IPV4_COMPATIBLE or ip in SITE_LOCAL:
            return False
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


class AddressRefused(ImageRefused):
    """The URL's host (or a redirect's) is, or resolves to, an address the AddressPolicy does not permit."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for a name, in its order of preference."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT_S)
    return list(dict.fromkeys(info[4][0] for info in infos))


class AddressPolicy:
    """Which addresses an image URL may reach: public ones, plus the networks an operator trusts
    (`limits.private_image_networks`), or all (`allow_private_image_urls`). Names are resolved once, by
    `resolver` (the system's unless a test injects one), and every answer must pass."""

    def __init__(self, allow_private: bool = False, trusted: Iterable[Network] = (),
                 resolver: Resolver | None = None) -> None:
        self.allow_private = allow_private
        self.trusted = tuple(trusted)
        self.resolve = resolver or system_resolver

    def permits(self, address: IPAddress) -> bool:
        if self.allow_private:
            return True
        return any(address in network for network in self.trusted if address.version == network.version) \
            or is_public(address)

    async def check(self, url: ImageURL) -> list[IPAddress]:
        """The addresses to connect to, resolved once; one refused answer is enough to refuse the URL."""
        if url.address is not None:
            found = [url.address]
        else:
            try:
                found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await self.resolve(url.host, url.port)]
            except (OSError, TimeoutError, ValueError):
                raise ImageRefused("the image URL host could not be resolved.") from None
        if not found or not all(self.permits(address) for address in found):
            raise AddressRefused(f"image URLs must point to public addresses {NOT_PUBLIC}.")
        return found

"""Where webhooks may go: the URL's form, and the addresses its host resolves to.

A webhook must not become a way into the operator's network: by default only globally routable
unicast addresses are reached (no private, loopback, link-local, shared, multicast, reserved or
unspecified ones), unless the operator allows them (ARCDIFF_WEBHOOK_ALLOW_PRIVATE, or the networks
in ARCDIFF_WEBHOOK_ALLOW_NETWORKS). The host is checked when the generation is submitted and
resolved again at every delivery; the delivery then connects to the very address it checked (the
URL's host replaced by it, with the Host header and TLS server name kept), so a DNS answer that
changes in between (DNS rebinding) cannot move it elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(ValueError):
    """The URL may not be called: the message says why (for a 422 or an attempt's error)."""


class Unresolvable(OSError):
    """The host did not resolve now (perhaps only for now)."""


def check_url(url: str) -> httpx.URL:
    """The URL parsed, or ValueError naming what is wrong with its form (no DNS here)."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("the URL contains whitespace or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise ValueError(f"not a URL: {e}") from None
    if parsed.scheme not in SCHEMES:
        raise ValueError(f"the scheme must be http or https, got {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise ValueError("the URL has no host")
    if parsed.fragment:
        raise ValueError("the URL has a #fragment, which is never sent")
    return parsed


def address_class(ip: IPAddress) -> str | None:
    """What makes `ip` no public unicast address ('a loopback address', ...), or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for what, flag in (
        ("an unspecified address", ip.is_unspecified),
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("a multicast address", ip.is_multicast),
        ("a reserved address", ip.is_reserved),
        ("a private address", ip.is_private),
        ("not a globally routable address", not ip.is_global),
    ):
        if flag:
            return what
    return None


@dataclass(frozen=True)
class Target:
    """A checked URL pinned to one address: call `url` with `headers` and `extensions`."""

    url: httpx.URL
    address: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


class TargetPolicy:
    """Which addresses webhooks may reach (the operator's settings)."""

    def __init__(self, allow_private: bool = False, allow_networks: Iterable[str] = ()):
        self.allow_private = allow_private
        self.allow_networks: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in allow_networks]

    def refusal(self, ip: IPAddress) -> str | None:
        """Why webhooks may not reach `ip`, or None."""
        what = address_class(ip)
        if what is None or self.allow_private:
            return None
        plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        if any(plain in net for net in self.allow_networks if net.version == plain.version):
            return None
        return f"{ip} is {what}, which webhooks may not reach here"

    async def resolve(self, url: str) -> Target:
        """Check `url`'s form and every address its host has now; the target pinned to the first.

        TargetRefused: a bad URL or a refused address (any one of the host's addresses refuses
        it: a name that mixes public and private addresses is not reached). Unresolvable: no
        address now."""
        try:
            parsed = check_url(url)
        except ValueError as e:
            raise TargetRefused(str(e)) from None
        host = parsed.host
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await _lookup(host, port)
        for ip in addresses:
            why = self.refusal(ip)
            if why:
                raise TargetRefused(f"host {host}: {why}" if str(ip) != host else why)
        pinned = str(addresses[0])
        headers = {"Host": parsed.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return Target(parsed.copy_with(host=pinned), pinned, headers, extensions)


async def _lookup(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise Unresolvable(f"host {host} does not resolve: {e}") from None
    out: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone
        if ip not in out:
            out.append(ip)
    if not out:
        raise Unresolvable(f"host {host} has no address")
    return out

"""SSRF guard: never let a crawled URL make us talk to internal services.

A URL from Common Crawl is attacker-controlled. Before each request (and after each
redirect) :func:`check_url` refuses IP-literal hosts that are not public, however the
literal is written (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:7f00:1]``...).
Host names are checked at connect time by :class:`GuardedResolver`, which the HTTP
client uses as its only resolver: it resolves once, refuses the host if ANY address is
not public, and the client then connects to exactly the addresses it validated. There is
therefore no window between "check" and "connect" for DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")

# Ranges that ipaddress' flags do not all cover on every Python version.
_EXTRA_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches localhost on Linux
        "100.64.0.0/10",  # carrier-grade NAT, often internal in clouds
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "64:ff9b:1::/48",  # local-use NAT64
    )
]


class SSRFBlocked(OSError):
    """The request would reach a non-public address. Subclasses OSError so HTTP clients
    propagate it from their resolver as a connection error we can recognise."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
"""Well-known NAT64 prefix: its last 32 bits are an IPv4 address."""

def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, compatible, 6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if packed[:12] == b"\x00" * 12 and packed[12:] not in (b"\x00\x00\x00\x00", b"\x00\x00\x00\x01"):
        return ipaddress.IPv4Address(packed[12:])  # deprecated IPv4-compatible ::a.b.c.d
    if ip in _NAT64:
        return ipaddress.IPv4Address(packed[12:])
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None if it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            return f"{reason} (embedded in {ip})" if reason else None
    checks = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("unspecified", ip.is_unspecified),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("non-global", not ip.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"{name} address {ip}"
    for net in _EXTRA_BLOCKED:
        if ip.version == net.version and ip in net:
            return f"reserved address {ip} in {net}"
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """Parse ``host`` as an IP literal in any form a resolver would accept, else None.

    ``getaddrinfo``/``inet_aton`` accept decimal (``2130706433``), hex (``0x7f000001``),
    octal (``0177.0.0.1``) and short (``127.1``) IPv4 forms, so we must too.
    """
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if all(c in "0123456789abcdefx." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_ip(ip: IPAddress, allow_private: bool = False) -> None:
    if allow_private:
        return
    reason = blocked_reason(ip)
    if reason:
        raise SSRFBlocked(f"refused {reason}")


def check_url(url: str, allow_private: bool = False) -> None:
    """Refuse non-http(s) schemes, credentials in URLs and non-public IP-literal hosts.

    Host names are not resolved here: that happens once, at connect time, in
    :class:`GuardedResolver`. Raises :class:`SSRFBlocked` or ValueError (invalid URL).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise ValueError(f"scheme {parts.scheme!r} is not http(s)")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    _ = parts.port  # raises ValueError on a bad port
    ip = parse_ip_literal(host)
    if ip is not None:
        check_ip(ip, allow_private)
    elif not allow_private:
        name = host.rstrip(".").lower()
        if name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
            raise SSRFBlocked(f"refused local host name {host!r}")


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp resolver that validates every address before the connector may use it.

    ``inner`` is the real resolver (aiohttp's ThreadedResolver by default). The connector
    connects to the addresses returned here and nothing else, so the check and the
    connect use the same resolution.
    """

    def __init__(self, allow_private: bool = False, inner: Any = None) -> None:
        self.allow_private = allow_private
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        results = await self._inner.resolve(host, port, family)
        if not self.allow_private:
            for result in results:
                reason = blocked_reason(ipaddress.ip_address(result["host"]))
                if reason:
                    raise SSRFBlocked(f"refused {host!r}: resolves to {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


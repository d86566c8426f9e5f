"""Who is calling: the client address a per-source limit counts (docs/security.md, "Hostile traffic").

Behind the ALB the TCP peer is the load balancer; the caller is in `X-Forwarded-For`, which
the ALB appends to (it keeps whatever the client sent, to the left). So the caller is the
right-most hop that is not one of our own proxies: hops are read from the right, each one
inside a trusted network (the ALB's, e.g. the VPC's CIDR) is skipped, and the first other one
is the client. A client can prepend anything it likes; it cannot change what our proxies
appended, so a forged header moves nothing. With no trusted network (the default) the header
is ignored and the peer address is the client.

IPv6 addresses count per /64: one subscriber usually holds a whole /64, and would otherwise
have 2^64 addresses to spread a flood over.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IPV6_PREFIX = 64
MAX_HOPS = 20  # a longer header is read from its right end only


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """The trusted networks; ValueError names the first that is not a CIDR or an address."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def _parse(hop: str) -> Address | None:
    hop = hop.strip()
    if hop.startswith("[") and "]" in hop:  # [v6]:port
        hop = hop[1 : hop.index("]")]
    elif hop.count(":") == 1:  # v4:port
        hop = hop.split(":", 1)[0]
    try:
        return ipaddress.ip_address(hop)
    except ValueError:
        return None


def _trusted(address: Address | None, trusted: tuple[Network, ...]) -> bool:
    return address is not None and any(address in n for n in trusted)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The key a per-source limit counts: the right-most untrusted hop, or the peer."""
    address = _parse(peer)
    if forwarded_for and _trusted(address, trusted):
        for hop in reversed(forwarded_for.split(",")[-MAX_HOPS:]):
            hop_address = _parse(hop)
            address = hop_address
            if hop_address is None:  # not an address: the caller wrote it; count it as one
                return "invalid:" + hop.strip()[:60]
            if not _trusted(hop_address, trusted):
                break
        # every hop trusted: the left-most one read is the closest we know to the caller
    return key_of(address) if address is not None else "invalid:" + peer[:60]


def key_of(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False))
    return str(address)

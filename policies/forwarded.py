"""Who is calling: the client address of a request that may have come through proxies.

A request's TCP peer is the client unless the peer is one of ``server.trusted_proxies``. Through
trusted proxies, ``X-Forwarded-For`` is read from the right: each trusted proxy appended the
address of the peer it saw, so the rightmost entry that is not a trusted proxy is the client. What
lies left of it was written by the client and is never believed. When every hop is trusted, the
leftmost one is the client; when the first untrusted entry is not an address, the last trusted
hop is taken (the best address known to be true).

Pure: the networks come parsed (:func:`networks`), the header values as given.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=16)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """``("10.0.0.0/8", "::1")`` -> networks; raises ValueError naming a bad entry."""
    found = []
    for cidr in cidrs:
        try:
            found.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not an address or CIDR network: {cidr!r}") from exc
    return tuple(found)


def parse_address(text: str) -> Address | None:
    """An address as proxies write it: ``1.2.3.4``, ``1.2.3.4:5678``, ``::1``, ``[::1]:5678``."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str:
    """The client's address (normalised text), or ``"-"`` when the peer is unknown."""
    peer_address = parse_address(peer) if peer else None
    if peer_address is None:
        return peer or "-"
    if not trusted or not _trusted(peer_address, trusted):
        return str(peer_address)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer_address
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            break  # written by someone we do not trust: keep the last trusted hop
        client = address
        if not _trusted(address, trusted):
            break
    return str(client)

"""Which IP addresses the gateway may send a webhook to: public unicast only.

A webhook URL is chosen by a team admin, so a delivery is a request the gateway makes on their
behalf; aimed at the inside (loopback, the private networks, the cloud metadata service) it
would be a server-side request forgery. :func:`classify` names the kind of an address;
:func:`refusal` says whether webhooks must not reach it. IPv6 addresses that carry an IPv4
address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4 ``2002::/16``, Teredo) are judged by the IPv4 address they reach.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address

PUBLIC = "public"
METADATA = "metadata"
UNSPECIFIED = "unspecified"
LOOPBACK = "loopback"
PRIVATE = "private"
LINK_LOCAL = "link-local"
CGNAT = "cgnat"
MULTICAST = "multicast"
RESERVED = "reserved"  # anything else not globally routable: documentation, benchmarking, ...

#: Cloud instance metadata services (some are public or CGNAT addresses, so named one by one):
#: AWS/GCP/Azure/OCI/DigitalOcean, AWS ECS task metadata, Azure's wire server, Alibaba, and AWS's
#: IPv6 endpoints.
METADATA_ADDRESSES = frozenset(
    ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "168.63.129.16",
        "100.100.100.200",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)

_V4: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), kind)
    for net, kind in (
        ("0.0.0.0/8", UNSPECIFIED),
        ("127.0.0.0/8", LOOPBACK),
        ("10.0.0.0/8", PRIVATE),
        ("172.16.0.0/12", PRIVATE),
        ("192.168.0.0/16", PRIVATE),
        ("169.254.0.0/16", LINK_LOCAL),
        ("100.64.0.0/10", CGNAT),
        ("224.0.0.0/4", MULTICAST),
    )
)
_V6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), kind)
    for net, kind in (
        ("::/128", UNSPECIFIED),
        ("::1/128", LOOPBACK),
        ("fc00::/7", PRIVATE),  # unique local
        ("fec0::/10", PRIVATE),  # site local (deprecated, still routed by some stacks)
        ("fe80::/10", LINK_LOCAL),
        ("ff00::/8", MULTICAST),
    )
)
_V4_COMPATIBLE = IPv6Network("::/96")
_NAT64 = (IPv6Network("64:ff9b::/96"), IPv6Network("64:ff9b:1::/48"))


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through a translation or tunnel, if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _V4_COMPATIBLE and int(address) > 1:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in net for net in _NAT64):
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse(address: str | IPAddress) -> IPAddress:
    """An address from text; an IPv6 zone (``fe80::1%eth0``) is dropped. ValueError if none."""
    if isinstance(address, IPv4Address | IPv6Address):
        return address
    return ip_address(address.split("%", 1)[0].strip("[]"))


def classify(address: str | IPAddress) -> str:
    """The kind of an address: :data:`PUBLIC` or the reason it is not."""
    ip = parse(address)
    if ip in METADATA_ADDRESSES:
        return METADATA
    if isinstance(ip, IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return classify(inner)
        kinds: tuple[tuple[IPv4Network | IPv6Network, str], ...] = _V6
    else:
        kinds = _V4
    for net, kind in kinds:
        if ip in net:
            return kind
    return PUBLIC if ip.is_global else RESERVED


def refusal(address: str | IPAddress, *, allow_private: bool = False) -> str | None:
    """None when a webhook may be sent to ``address``, else the kind that refuses it.
    ``allow_private`` (config ``alerts.allow_private_urls``) allows every address."""
    if allow_private:
        return None
    kind = classify(address)
    return None if kind == PUBLIC else kind

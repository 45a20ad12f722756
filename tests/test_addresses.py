"""policies.addresses as a table: where a webhook may be sent (public unicast only)."""

from __future__ import annotations

import pytest

from policies import addresses as A

TABLE = [
    # public
    ("93.184.216.34", A.PUBLIC),
    ("8.8.8.8", A.PUBLIC),
    ("2606:4700:4700::1111", A.PUBLIC),
    ("::ffff:8.8.8.8", A.PUBLIC),
    ("2002:808:808::1", A.PUBLIC),  # 6to4 of 8.8.8.8
    ("64:ff9b::808:808", A.PUBLIC),  # NAT64 of 8.8.8.8
    # unspecified
    ("0.0.0.0", A.UNSPECIFIED),
    ("0.1.2.3", A.UNSPECIFIED),
    ("::", A.UNSPECIFIED),
    ("::ffff:0.0.0.0", A.UNSPECIFIED),
    # loopback
    ("127.0.0.1", A.LOOPBACK),
    ("127.255.255.254", A.LOOPBACK),
    ("::1", A.LOOPBACK),
    ("::ffff:127.0.0.1", A.LOOPBACK),
    ("::ffff:7f00:1", A.LOOPBACK),
    ("::127.0.0.1", A.LOOPBACK),  # IPv4-compatible
    ("64:ff9b::7f00:1", A.LOOPBACK),  # NAT64
    ("2002:7f00:1::", A.LOOPBACK),  # 6to4
    # private
    ("10.0.0.1", A.PRIVATE),
    ("172.16.0.1", A.PRIVATE),
    ("172.31.255.255", A.PRIVATE),
    ("192.168.1.1", A.PRIVATE),
    ("fc00::1", A.PRIVATE),
    ("fd12:3456::1", A.PRIVATE),
    ("fec0::1", A.PRIVATE),
    ("::ffff:10.1.2.3", A.PRIVATE),
    ("::ffff:192.168.0.1", A.PRIVATE),
    # link-local
    ("169.254.0.1", A.LINK_LOCAL),
    ("fe80::1", A.LINK_LOCAL),
    ("fe80::1%eth0", A.LINK_LOCAL),
    ("::ffff:169.254.1.1", A.LINK_LOCAL),
    # carrier-grade NAT
    ("100.64.0.1", A.CGNAT),
    ("100.127.255.254", A.CGNAT),
    # multicast
    ("224.0.0.1", A.MULTICAST),
    ("239.255.255.250", A.MULTICAST),
    ("ff02::1", A.MULTICAST),
    # cloud metadata, public-looking ones included
    ("169.254.169.254", A.METADATA),
    ("::ffff:169.254.169.254", A.METADATA),
    ("168.63.129.16", A.METADATA),
    ("100.100.100.200", A.METADATA),
    ("fd00:ec2::254", A.METADATA),
    # everything else that is not globally routable
    ("255.255.255.255", A.RESERVED),
    ("240.0.0.1", A.RESERVED),
    ("192.0.2.1", A.RESERVED),
    ("198.18.0.1", A.RESERVED),
    ("2001:db8::1", A.RESERVED),
    ("100::1", A.RESERVED),
]


@pytest.mark.parametrize(("address", "kind"), TABLE)
def test_classify(address: str, kind: str) -> None:
    assert A.classify(address) == kind


@pytest.mark.parametrize(("address", "kind"), TABLE)
def test_refusal(address: str, kind: str) -> None:
    assert A.refusal(address) == (None if kind == A.PUBLIC else kind)
    assert A.refusal(address, allow_private=True) is None


def test_classify_refuses_what_is_not_an_address() -> None:
    for text in ("", "localhost", "127.1", "2130706433", "1.2.3.4.5", ":::1"):
        with pytest.raises(ValueError):
            A.classify(text)

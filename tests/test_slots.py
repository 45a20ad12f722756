"""Key slots: the pure CRC16 function against Redis Cluster's own rule, and against a real
cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from policies import keyspace as rk
from policies.slots import SLOTS, crc16, hash_tag, key_slot
from tests.redis_cluster import LocalCluster


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        ("123456789", 12739),  # CRC16/XMODEM check value 0x31C3
        ("foo", 12182),
        ("bar", 5061),
        ("{user1000}.following", 3443),
        ("{user1000}.followers", 3443),
        ("foo{}{bar}", 8363),  # an empty tag: the whole key
        ("foo{{bar}}zap", 4015),  # the tag is "{bar"
        ("foo{bar}{zap}", 5061),  # the first tag only: "bar"
        ("", 0),
    ],
)
def test_key_slot(key: str, slot: int) -> None:
    assert key_slot(key) == slot
    assert key_slot(key.encode()) == slot


def test_crc16_and_hash_tag() -> None:
    assert crc16(b"123456789") == 0x31C3
    assert hash_tag(b"{acct:t_1}:s") == b"acct:t_1"
    assert hash_tag(b"no tag") == b"no tag"
    assert hash_tag(b"open{only") == b"open{only"


def test_every_key_of_an_account_is_on_the_account_slot() -> None:
    ak = rk.AccountKeys("t_0123abcd")
    slot = rk.account_slot("t_0123abcd")
    keys = [
        ak.state,
        ak.period("2026-01"),
        ak.cfg,
        ak.keys,
        ak.blocked("u1"),
        ak.hold_expiry,
        ak.hold_values,
        ak.settled_marker("r1"),
        ak.usage_stream,
        ak.alerts,
    ]
    assert {key_slot(k) for k in keys} == {slot}
    assert 0 <= slot < SLOTS


@pytest.mark.slow
def test_slots_match_a_real_cluster(tmp_path: Path) -> None:
    keys = [f"{{acct:t_{i:04x}}}:s" for i in range(200)] + ["foo", "foo{}{bar}", "a{b}c"]
    with (
        LocalCluster(tmp_path, masters=1, replicas=0) as cluster,
        redis.Redis.from_url(cluster.url, decode_responses=True) as client,
    ):
        for key in keys:
            assert key_slot(key) == client.cluster("keyslot", key), key

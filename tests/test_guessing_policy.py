"""Pure rules against hostile users, as tables: the client address behind proxies, the buckets
and back-off against guessing."""

from __future__ import annotations

import pytest

from policies import forwarded, guessing
from policies.guessing import ACCOUNT, CLIENT, PAIR, Rule

PROXIES = forwarded.networks(("10.0.0.0/8", "192.168.1.1", "fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        # No trusted peer: the header is never read.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        ("203.0.113.9", [], "203.0.113.9"),
        # Through a trusted proxy: the rightmost hop that is not one of ours.
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client's own claim left
        ("10.0.0.2", ["6.6.6.6", "198.51.100.1, 10.0.0.7"], "198.51.100.1"),  # two headers
        ("192.168.1.1", ["198.51.100.1 , 10.1.2.3"], "198.51.100.1"),
        ("192.168.1.2", ["198.51.100.1"], "192.168.1.2"),  # a /32 entry: only that one
        # Every hop ours: the leftmost; no header at all: the proxy itself.
        ("10.0.0.2", ["10.0.0.5, 10.0.0.6"], "10.0.0.5"),
        ("10.0.0.2", [], "10.0.0.2"),
        # Garbage where the client should be: the last hop known to be true.
        ("10.0.0.2", ["198.51.100.1, bogus"], "10.0.0.2"),
        ("10.0.0.2", ["bogus, 10.0.0.9"], "10.0.0.9"),
        ("10.0.0.2", ["unknown"], "10.0.0.2"),
        # Ports, brackets, IPv6, IPv4-mapped peers.
        ("10.0.0.2", ["198.51.100.1:4711"], "198.51.100.1"),
        ("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("fd00::1", ["2001:db8::2"], "2001:db8::2"),
        ("::ffff:10.0.0.2", ["198.51.100.3"], "198.51.100.3"),
        ("2001:db8::9", ["198.51.100.3"], "2001:db8::9"),
        # No peer (a unix socket): as it is.
        (None, ["198.51.100.1"], "-"),
    ],
)
def test_client_address(peer: str | None, xff: list[str], client: str) -> None:
    assert forwarded.client_address(peer, xff, PROXIES) == client


def test_no_trusted_proxies_means_the_peer() -> None:
    assert forwarded.client_address("10.0.0.2", ["198.51.100.1"], ()) == "10.0.0.2"


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.com", "", "10.0.0.1/8/8"])
def test_bad_networks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="CIDR"):
        forwarded.networks((bad,))


RULE = Rule(PAIR, free=5, first_wait_s=2, max_wait_s=900, window_s=3600)


@pytest.mark.parametrize(
    ("attempts", "wait"),
    [(1, 0), (4, 0), (5, 2), (6, 4), (7, 8), (13, 512), (14, 900), (15, 900), (10_000, 900)],
)
def test_back_off(attempts: int, wait: int) -> None:
    assert RULE.wait_after(attempts) == wait


def test_schedule_is_the_back_off_from_free_on() -> None:
    schedule = RULE.schedule()
    assert schedule == (2, 4, 8, 16, 32, 64, 128, 256, 512, 900)
    for attempts in range(RULE.free, RULE.free + 20):
        at = min(attempts - RULE.free, len(schedule) - 1)
        assert schedule[at] == RULE.wait_after(attempts)


def test_login_rules_pair_tight_account_loose_and_short() -> None:
    pair, account, client = guessing.LOGIN
    assert (pair.scope, account.scope, client.scope) == (PAIR, ACCOUNT, CLIENT)
    assert pair.free < account.free  # a stranger hits their own pair bucket long before
    assert account.max_wait_s <= 30  # the per-account ceiling slows, never locks out for long
    assert pair.on_success == guessing.CLEAR and account.on_success == guessing.REFUND


@pytest.mark.parametrize(
    ("kind", "account", "idents"),
    [
        ("login", "usr_1", ["usr_1|198.51.100.1", "usr_1", "198.51.100.1"]),
        ("invite", "usr_1", ["usr_1", "198.51.100.1"]),
        ("invite", None, ["198.51.100.1"]),  # a token looked up without an account
    ],
)
def test_buckets(kind: str, account: str | None, idents: list[str]) -> None:
    found = guessing.buckets(kind, guessing.RULES[kind], account, "198.51.100.1")
    assert [b.ident for b in found] == idents


@pytest.mark.parametrize(("wait_ms", "seconds"), [(1, 1), (999, 1), (1000, 1), (1001, 2), (0, 1)])
def test_retry_after_rounds_up(wait_ms: int, seconds: int) -> None:
    assert guessing.retry_after(wait_ms) == seconds

"""Holds and settlement: how long a hold lives, and which funds a settled cost draws.

A hold reserves the worst-case cost of a request until it settles. Holds expire on their own
(``hold_ttl``) so a crashed gateway never locks funds for good. Settling draws the period's
allowance first, then credits; credits may go below zero only when the upstream reports more
than the hold allowed for, which the hold's over-estimate of the prompt makes rare.
"""

from __future__ import annotations

from dataclasses import dataclass

HOLD_MARGIN_S = 60


@dataclass(frozen=True, slots=True)
class Debit:
    from_allowance: int
    from_credits: int


def hold_ttl(upstream_timeout_s: float, margin_s: int = HOLD_MARGIN_S) -> int:
    """Seconds a hold lives: the longest a request can take upstream, plus a margin."""
    return int(upstream_timeout_s) + margin_s


def split_debit(charged: int, allowance: int, allowance_spent: int) -> Debit:
    left = max(0, allowance - allowance_spent)
    from_allowance = min(max(0, charged), left)
    return Debit(from_allowance=from_allowance, from_credits=max(0, charged) - from_allowance)


def discounted_hold(worst_list_cost: int, discount_bps: int) -> int:
    """The hold after discount, computed the way ``hold.lua`` does it (exact below 2^53)."""
    keep = 10_000 - min(max(0, discount_bps), 10_000)
    return (worst_list_cost // 10_000) * keep + (worst_list_cost % 10_000) * keep // 10_000

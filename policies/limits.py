"""Whether a request may go upstream: the decision the hold step takes.

``decide`` is the reference; ``lua/hold.lua`` takes the same decision atomically in Redis and the
parity tests run one table through both. Checks, in order (first failure wins):

1. the key is active in its billing account           -> ``invalid_api_key``
2. the model is not blocked for the account           -> ``model_not_allowed``
3. allowance left + credits - holds covers the hold   -> ``insufficient_quota``
4. team spend + holds + hold <= team spending limit   -> ``team_spending_limit_reached``
5. hard member limit: member spend + member holds + hold <= limit -> ``member_limit_reached``
6. soft member limit: member spend + hold > limit admits the request with a warning

"Greater than the limit" refuses; reaching it exactly is allowed. Soft limits count settled spend
only, hard limits count settled spend plus holds.

``member_spend`` is the member's settled spend in the team this period across both billing
accounts: in Redis, ``ms:<scope>`` of the account billed now plus ``mx:<scope>``, what was billed to
the other account before a billing-mode switch (gateway/billing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

HARD = "hard"
SOFT = "soft"
ENFORCEMENTS = (HARD, SOFT)


class Refusal(StrEnum):
    INVALID_API_KEY = "invalid_api_key"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    TEAM_SPENDING_LIMIT = "team_spending_limit_reached"
    MEMBER_LIMIT = "member_limit_reached"


@dataclass(frozen=True, slots=True)
class HoldState:
    """What the hold step sees of one billing account (all money in nano-dollars)."""

    key_active: bool = True
    model_blocked: bool = False
    allowance: int = 0  # this period's allowance
    allowance_spent: int = 0  # drawn from it this period
    credits: int = 0
    holds: int = 0  # every active hold on the account
    spend: int = 0  # charged this period
    spending_limit: int | None = None
    member_spend: int = 0  # ms + mx: settled this period, both billing accounts
    member_holds: int = 0
    member_limit: int | None = None
    enforcement: str = HARD


@dataclass(frozen=True, slots=True)
class Decision:
    refusal: Refusal | None
    warn_member_limit: bool = False

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def allowance_left(allowance: int, allowance_spent: int) -> int:
    return max(0, allowance - allowance_spent)


def available(state: HoldState) -> int:
    """Balance that can still be held: allowance left + credits - active holds."""
    return allowance_left(state.allowance, state.allowance_spent) + state.credits - state.holds


def decide(state: HoldState, hold: int) -> Decision:
    if not state.key_active:
        return Decision(Refusal.INVALID_API_KEY)
    if state.model_blocked:
        return Decision(Refusal.MODEL_NOT_ALLOWED)
    if available(state) < hold:
        return Decision(Refusal.INSUFFICIENT_QUOTA)
    if state.spending_limit is not None and state.spend + state.holds + hold > state.spending_limit:
        return Decision(Refusal.TEAM_SPENDING_LIMIT)
    warn = False
    if state.member_limit is not None:
        if state.enforcement == HARD:
            if state.member_spend + state.member_holds + hold > state.member_limit:
                return Decision(Refusal.MEMBER_LIMIT)
        elif state.member_spend + hold > state.member_limit:
            warn = True
    return Decision(None, warn_member_limit=warn)


def effective_member_limit(
    override: int | None, override_set: bool, team_default: int | None
) -> int | None:
    """The per-member override when one is set (``None`` there means "no limit"), else the
    team default."""
    return override if override_set else team_default


def effective_enforcement(override: str | None, team_default: str | None) -> str:
    return override or team_default or HARD

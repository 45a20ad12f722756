"""Limit alerts: when a member or the team crosses a threshold of a limit, and how often a failed
webhook delivery is retried.

Thresholds are 80 % and 100 % of a limit, plus ``exceeded`` for a soft member limit. A threshold
is *crossed* by the settle that moves the settled spend from below its amount to at or above it;
``settle.lua`` runs :func:`crossings` on every settle (the parity tests feed both one table).
A request refused by a limit also counts as reaching 100 % of it (``hold.lua``): with worst-case
holds, a hard limit usually refuses requests before the settled spend reaches it exactly.

Each threshold fires once per period and limit value (dedupe flag in the account's period hash,
backed by a unique constraint in PostgreSQL): raising the limit mid-period re-arms it.
"""

from __future__ import annotations

THRESHOLDS_PCT = (80, 100)
REACHED = "100"
EXCEEDED = "exceeded"

TEAM = "team"
MEMBER = "member"

#: event type by (limit kind, threshold)
EVENT_TYPES = {
    (TEAM, "80"): "spending_limit.threshold_reached",
    (TEAM, "100"): "spending_limit.threshold_reached",
    (MEMBER, "80"): "member_limit.threshold_reached",
    (MEMBER, "100"): "member_limit.threshold_reached",
    (MEMBER, EXCEEDED): "member_limit.soft_exceeded",
}

BASE_BACKOFF_S = 1.0
MAX_BACKOFF_S = 3600.0
MAX_ATTEMPTS = 15


def threshold_amount(limit: int, percent: int) -> int:
    """The spend at which ``percent`` of ``limit`` is reached: ceil(limit * percent / 100).

    ``settle.lua`` computes it as ``floor(limit / 100) * p + ceil((limit % 100) * p / 100)``,
    exact on doubles below 2^53."""
    return -(-limit * percent // 100)


def crossings(
    before: int, after: int, limit: int | None, *, soft: bool = False, warned: bool = False
) -> tuple[str, ...]:
    """Thresholds crossed when settled spend moves from ``before`` to ``after``.

    ``soft``: the limit is a soft member limit; ``warned``: the request's hold already warned
    (its header said ``member_limit_exceeded``), so the soft limit counts as exceeded."""
    if limit is None or limit < 0:
        return ()
    crossed = [str(p) for p in THRESHOLDS_PCT if before < threshold_amount(limit, p) <= after]
    if soft and (warned or before <= limit < after):
        crossed.append(EXCEEDED)
    return tuple(crossed)


def event_type(kind: str, threshold: str) -> str:
    return EVENT_TYPES[(kind, threshold)]


def retry_delay(
    attempts: int, base_s: float = BASE_BACKOFF_S, cap_s: float = MAX_BACKOFF_S
) -> float:
    """Seconds before the next try after ``attempts`` failed ones: base * 2^(attempts-1), capped."""
    return float(min(cap_s, base_s * 2 ** max(0, attempts - 1)))


def gives_up(attempts: int, max_attempts: int = MAX_ATTEMPTS) -> bool:
    return attempts >= max_attempts

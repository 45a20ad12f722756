"""Whether a request may go upstream: the decision the hold step takes.

``decide`` is the reference; ``lua/hold.lua`` takes the same decision atomically in Redis and the
parity tests run one table through both. Checks, in order (first failure wins):

1. the key is active in its billing account           -> ``invalid_api_key``
2. the key has not expired (now >= expires_at: expired) -> ``key_expired`` (401 invalid_api_key)
3. the model is in the key's ``models`` (when set)     -> ``model_not_allowed``
4. the model is not blocked for the account           -> ``model_not_allowed``
5. allowance left + credits - holds covers the hold   -> ``insufficient_quota``
6. team spend + holds + hold <= team spending limit   -> ``team_spending_limit_reached``
7. hard member limit: member spend + member holds + hold <= limit -> ``member_limit_reached``
8. key limit (hard): key spend + key holds + hold <= limit -> ``key_limit_reached``
9. rate limits of the key, the member and the team (policies/ratelimits.py): one more request
   and the request's worst-case tokens fit the last 60 s of each -> ``rate_limit_exceeded``
10. soft member limit: member spend + hold > limit admits the request with a warning

"Greater than the limit" refuses; reaching it exactly is allowed. Soft limits count settled spend
only, hard limits count settled spend plus holds. Money comes before rate: a refusal that lasts
until the period ends is reported before one that lasts seconds. From step 5 on, the decision
also carries the rate-limit figures of the headers (``Decision.rate``).

A key's controls travel in its entry of the account's key set (``{acct:A}:keys``): the member
scope alone for a key without controls, else ``scope|expires_at|limit|rpm|tpm|models``
(:func:`key_entry`), so the hold script reads them with the one ``HGET`` that checks the key.

``member_spend`` is the member's settled spend in the team this period across both billing
accounts: in Redis, ``ms:<scope>`` of the account billed now plus ``mx:<scope>``, what was billed to
the other account before a billing-mode switch (gateway/billing.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from policies.ratelimits import RateView, Window, retry_after, stamp, view

HARD = "hard"
SOFT = "soft"
ENFORCEMENTS = (HARD, SOFT)


class Refusal(StrEnum):
    INVALID_API_KEY = "invalid_api_key"
    KEY_EXPIRED = "key_expired"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    TEAM_SPENDING_LIMIT = "team_spending_limit_reached"
    MEMBER_LIMIT = "member_limit_reached"
    KEY_LIMIT = "key_limit_reached"
    RATE_LIMIT = "rate_limit_exceeded"


@dataclass(frozen=True, slots=True)
class KeyControls:
    """What a key's owner set on it (contract section 10); None = no such control."""

    expires_at: int | None = None  # unix seconds: refused from this second on
    models: tuple[str, ...] | None = None  # the models it may use
    monthly_limit: int | None = None  # nano-dollars, hard
    rpm: int | None = None
    tpm: int | None = None

    @property
    def empty(self) -> bool:
        return self == NO_CONTROLS


NO_CONTROLS = KeyControls()
MODEL_SEP = ","


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def key_entry(scope: str, controls: KeyControls = NO_CONTROLS) -> str:
    """A key's value in the account's key set: its member scope, then its controls if any.
    ``models`` is written ``,a,b,`` (``,`` alone: no model; empty: any)."""
    if controls.empty:
        return scope
    c = controls
    models = "" if c.models is None else MODEL_SEP + "".join(m + MODEL_SEP for m in c.models)
    parts = (scope, _opt(c.expires_at), _opt(c.monthly_limit), _opt(c.rpm), _opt(c.tpm), models)
    return "|".join(parts)


def parse_key_entry(entry: str) -> tuple[str, KeyControls]:
    parts = entry.split("|")
    if len(parts) != 6:
        return entry, NO_CONTROLS

    def opt(text: str) -> int | None:
        return int(text) if text else None

    models = None if not parts[5] else tuple(m for m in parts[5].split(MODEL_SEP) if m)
    controls = KeyControls(opt(parts[1]), models, opt(parts[2]), opt(parts[3]), opt(parts[4]))
    return parts[0], controls


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
    # section 10: the key's controls and spend, and the rate windows
    now: int = 0  # unix seconds
    model: str = ""
    key: KeyControls = NO_CONTROLS
    key_spend: int = 0  # settled on this key this period
    key_holds: int = 0
    now_ms: int = 0
    last_ms: int = 0  # the account's last rate-limit stamp (policies/ratelimits.py)
    key_window: Window = field(default_factory=Window)  # its limits are the key's rpm / tpm
    member_window: Window = field(default_factory=Window)
    team_window: Window = field(default_factory=Window)

    @property
    def windows(self) -> tuple[Window, Window, Window]:
        return (self.key_window, self.member_window, self.team_window)


@dataclass(frozen=True, slots=True)
class Decision:
    refusal: Refusal | None
    warn_member_limit: bool = False
    retry_after: int | None = None  # seconds, for rate_limit_exceeded
    rate: RateView | None = None  # the x-ratelimit-* figures, when a rate limit applies

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def allowance_left(allowance: int, allowance_spent: int) -> int:
    return max(0, allowance - allowance_spent)


def available(state: HoldState) -> int:
    """Balance that can still be held: allowance left + credits - active holds."""
    return allowance_left(state.allowance, state.allowance_spent) + state.credits - state.holds


def _access(state: HoldState) -> Refusal | None:
    """Steps 1 to 4: the key, its expiry, its models, the account's blocked models."""
    key = state.key
    if not state.key_active:
        return Refusal.INVALID_API_KEY
    if key.expires_at is not None and state.now >= key.expires_at:
        return Refusal.KEY_EXPIRED
    if key.models is not None and state.model not in key.models:
        return Refusal.MODEL_NOT_ALLOWED
    if state.model_blocked:
        return Refusal.MODEL_NOT_ALLOWED
    return None


def _money(state: HoldState, hold: int) -> tuple[Refusal | None, bool]:
    """Steps 5 to 8 and the soft warning of step 10: (refusal, warn)."""
    if available(state) < hold:
        return Refusal.INSUFFICIENT_QUOTA, False
    if state.spending_limit is not None and state.spend + state.holds + hold > state.spending_limit:
        return Refusal.TEAM_SPENDING_LIMIT, False
    warn = False
    if state.member_limit is not None:
        if state.enforcement == HARD:
            if state.member_spend + state.member_holds + hold > state.member_limit:
                return Refusal.MEMBER_LIMIT, False
        elif state.member_spend + hold > state.member_limit:
            warn = True
    limit = state.key.monthly_limit
    if limit is not None and state.key_spend + state.key_holds + hold > limit:
        return Refusal.KEY_LIMIT, False
    return None, warn


def decide(state: HoldState, hold: int, tokens: int = 0) -> Decision:
    """Admit or refuse a request whose hold is ``hold`` nano-dollars and whose worst case is
    ``tokens`` tokens (steps 1 to 10 above, in order)."""
    refusal = _access(state)
    if refusal is not None:
        return Decision(refusal)
    windows = state.windows
    limited = any(w.limited for w in windows)
    now = stamp(state.now_ms, state.last_ms)
    refusal, warn = _money(state, hold)
    retry = None
    if refusal is None and limited:
        retry = retry_after(windows, now, tokens)
        if retry is not None:
            refusal = Refusal.RATE_LIMIT
    admitted = refusal is None
    rate = view(windows, now, tokens, admitted=admitted) if limited else None
    return Decision(refusal, warn_member_limit=warn and admitted, retry_after=retry, rate=rate)


def effective_member_limit(
    override: int | None, override_set: bool, team_default: int | None
) -> int | None:
    """The per-member override when one is set (``None`` there means "no limit"), else the
    team default."""
    return override if override_set else team_default


def effective_enforcement(override: str | None, team_default: str | None) -> str:
    return override or team_default or HARD

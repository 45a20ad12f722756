"""The tables of sections 2 to 4: each row a situation and what the pure functions in
``policies`` decide. ``test_limits_table.py`` runs them through those functions,
``test_lua_parity.py`` through the Lua scripts on real Redis."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from policies.limits import (
    HARD,
    SOFT,
    HoldState,
    KeyControls,
    effective_enforcement,
    effective_member_limit,
)
from policies.pricing import apply_discount
from policies.ratelimits import WINDOW_MS, Window

BIG = 2**52
NOW = 1_795_000_000  # unix seconds of every row
MODEL = "gpt-4o-mini"
Entries = tuple[tuple[int, int], ...]  # (age in ms before the row's now_ms, tokens)
# Each rate log holds two requests by default, of 30 tokens each, aged differently per scope so
# that the Retry-After of each limit is its own: RPM 2 binds (a slot frees when the older leaves),
# TPM 120 binds for a request of 100 tokens (both must leave).
K_LOG: Entries = ((30_000, 30), (20_000, 30))
M_LOG: Entries = ((45_000, 30), (10_000, 30))
T_LOG: Entries = ((50_000, 30), (5_000, 30))


@dataclass(frozen=True)
class Row:
    """One account's state as Redis holds it (cfg fields raw: ``ml_set`` = an override exists)
    and one request; ``expect`` is the refusal code, None when admitted."""

    name: str
    worst: int = 1000  # the request's worst-case list cost
    disc: int = 0
    credits: int = 0
    alw: int = 0
    aspent: int = 0
    holds: int = 0
    spend: int = 0
    limit: int | None = None
    ms: int = 0  # member spend billed here
    mx: int = 0  # member spend billed to the other account
    mh: int = 0  # member holds (part of holds)
    dml: int | None = None
    den: str | None = None
    ml_set: bool = False
    ml: int | None = None
    me: str | None = None
    key_active: bool = True
    blocked: bool = False
    expect: str | None = None
    warn: bool = False
    # section 10: key controls, key spend, rate limits and logs
    now_ms: int = NOW * 1000
    last: int = 0  # the account's last rate stamp, relative to now_ms (0: none ahead)
    exp: int | None = None  # key expires_at, unix seconds
    models: tuple[str, ...] | None = None
    model: str = MODEL
    klimit: int | None = None
    ks: int = 0  # key spend this period, billed here
    kx: int = 0  # key spend this period, billed to the other account
    kh: int = 0  # key holds (part of holds)
    krpm: int | None = None
    ktpm: int | None = None
    mrpm: int | None = None
    mtpm: int | None = None
    trpm: int | None = None
    ttpm: int | None = None
    klog: Entries = K_LOG
    mlog: Entries = M_LOG
    tlog: Entries = T_LOG
    tokens: int = 100  # the request's worst-case tokens
    retry: int | None = None  # expected Retry-After of a rate refusal

    @property
    def hold(self) -> int:
        return apply_discount(self.worst, self.disc)

    @property
    def controls(self) -> KeyControls:
        return KeyControls(self.exp, self.models, self.klimit, self.krpm, self.ktpm)

    @property
    def last_ms(self) -> int:
        return self.now_ms + self.last if self.last else 0

    def log(self, entries: Entries) -> tuple[tuple[int, int], ...]:
        """(stamp ms, tokens), oldest first."""
        return tuple((self.now_ms - age, tokens) for age, tokens in entries)

    def state(self) -> HoldState:
        return HoldState(
            key_active=self.key_active,
            model_blocked=self.blocked,
            allowance=self.alw,
            allowance_spent=self.aspent,
            credits=self.credits,
            holds=self.holds,
            spend=self.spend,
            spending_limit=self.limit,
            member_spend=self.ms + self.mx,
            member_holds=self.mh,
            member_limit=effective_member_limit(self.ml, self.ml_set, self.dml),
            enforcement=effective_enforcement(self.me, self.den),
            now=self.now_ms // 1000,
            model=self.model,
            key=self.controls,
            key_spend=self.ks + self.kx,
            key_holds=self.kh,
            now_ms=self.now_ms,
            last_ms=self.last_ms,
            key_window=Window(self.krpm, self.ktpm, self.log(self.klog)),
            member_window=Window(self.mrpm, self.mtpm, self.log(self.mlog)),
            team_window=Window(self.trpm, self.ttpm, self.log(self.tlog)),
        )


Q = "insufficient_quota"
T = "team_spending_limit_reached"
M = "member_limit_reached"
RICH = 10**12

DECISIONS = [
    # balance: allowance left + credits - holds must cover the hold
    Row("credits cover exactly", credits=1000),
    Row("credits short by one", credits=999, expect=Q),
    Row("allowance first then credits", alw=600, aspent=100, credits=500),
    Row("allowance plus credits short", alw=600, aspent=100, credits=499, expect=Q),
    Row("overspent allowance counts zero", alw=100, aspent=300, credits=1000),
    Row("overspent allowance never negative", alw=100, aspent=300, credits=999, expect=Q),
    Row("holds use the balance", credits=2000, holds=1001, expect=Q),
    Row("negative credits", alw=5000, credits=-4000, expect=None),
    Row("negative credits short", alw=5000, credits=-4001, expect=Q),
    # discount applies to the hold, rounded down
    Row("discount makes it fit", credits=500, disc=5000),
    Row("discount rounding down fits", worst=999, disc=3333, credits=666),
    Row("discount rounding down short", worst=999, disc=3333, credits=665, expect=Q),
    Row("full discount holds nothing", disc=10000, credits=0),
    Row("huge amounts stay exact", worst=BIG, credits=BIG),
    Row("huge amounts short by one", worst=BIG + 1, credits=BIG, expect=Q),
    # team spending limit: settled + holds + hold > limit refuses; reaching it is allowed
    Row("team limit reached exactly", credits=RICH, limit=1000),
    Row("team limit passed by spend", credits=RICH, limit=1000, spend=1, expect=T),
    Row("team limit passed by holds", credits=RICH, limit=1000, holds=1, expect=T),
    Row("team limit zero", credits=RICH, limit=0, expect=T),
    Row("team limit zero with free request", credits=RICH, limit=0, disc=10000),
    Row("quota is checked before the team limit", credits=10, limit=0, expect=Q),
    Row("team limit before member limit", credits=RICH, limit=0, dml=0, expect=T),
    # model and key come first
    Row("blocked model", credits=RICH, blocked=True, expect="model_not_allowed"),
    Row("inactive key first", credits=0, blocked=True, key_active=False, expect="invalid_api_key"),
    # member limit: override when set (None = none), else the team default; hard counts holds
    Row("member default reached exactly", credits=RICH, dml=1000),
    Row("member default passed", credits=RICH, dml=1000, ms=1, expect=M),
    Row("member holds count when hard", credits=RICH, dml=1000, holds=1, mh=1, expect=M),
    Row("other members' holds do not", credits=RICH, dml=1000, holds=5000),
    Row("spend billed elsewhere counts", credits=RICH, dml=1000, mx=1, expect=M),
    Row("spend here and elsewhere", credits=RICH, dml=1500, ms=250, mx=250),
    Row("override none lifts the default", credits=RICH, dml=10, ml_set=True, ml=None),
    Row("override above the default", credits=RICH, dml=10, ml_set=True, ml=5000),
    Row("override below the default", credits=RICH, dml=5000, ml_set=True, ml=999, expect=M),
    Row("override zero", credits=RICH, ml_set=True, ml=0, expect=M),
    # soft: admitted, warned when settled spend + hold passes the limit; holds not counted
    Row("soft ignores holds", credits=RICH, dml=1000, den=SOFT, ms=0, holds=9000, mh=9000),
    Row("soft reached exactly no warning", credits=RICH, dml=1000, den=SOFT, ms=0),
    Row("soft passed warns", credits=RICH, dml=1000, den=SOFT, ms=1, warn=True),
    Row("soft far past warns", credits=RICH, dml=10, den=SOFT, ms=10**6, warn=True),
    Row("member soft over team hard", credits=RICH, dml=10, den=HARD, me=SOFT, ms=10, warn=True),
    Row("member hard over team soft", credits=RICH, dml=10, den=SOFT, me=HARD, ms=10, expect=M),
    Row("soft elsewhere spend warns", credits=RICH, dml=1000, den=SOFT, mx=1, warn=True),
    Row("soft still needs the balance", credits=999, dml=10, den=SOFT, expect=Q),
    Row("no limits at all", credits=RICH, spend=10**9, ms=10**9),
]

E = "key_expired"
A = "model_not_allowed"
KL = "key_limit_reached"
R = "rate_limit_exceeded"
S = 1000  # ms per second

CONTROLS = [
    # expiry, at the exact second: refused from expires_at on
    Row("expires in a second", credits=RICH, exp=NOW + 1),
    Row("expires in a millisecond", credits=RICH, now_ms=NOW * S + 999, exp=NOW + 1),
    Row("expires this very second", credits=RICH, exp=NOW, expect=E),
    Row("expired a second ago", credits=RICH, exp=NOW - 1, expect=E),
    Row("expiry before the key's models", credits=RICH, exp=NOW, models=(), expect=E),
    Row(
        "expiry comes after the key check",
        credits=RICH,
        exp=NOW,
        key_active=False,
        expect="invalid_api_key",
    ),
    # the key's models
    Row("model in the key's list", credits=RICH, models=("gpt-4o", MODEL)),
    Row("model outside the key's list", credits=RICH, models=("gpt-4o",), expect=A),
    Row("an empty list allows nothing", credits=RICH, models=(), expect=A),
    Row("a name that merely contains it", credits=RICH, models=("gpt-4o-mini-2",), expect=A),
    Row("listed but blocked for the team", credits=RICH, models=(MODEL,), blocked=True, expect=A),
    # the key's monthly limit (hard): spend + key holds + hold > limit refuses
    Row("key limit reached exactly", credits=RICH, klimit=1000),
    Row("key limit one over", credits=RICH, klimit=1001),
    Row("key limit one short", credits=RICH, klimit=999, expect=KL),
    Row("key limit counts its spend", credits=RICH, klimit=1500, ks=501, expect=KL),
    Row("key limit counts spend billed elsewhere", credits=RICH, klimit=1500, kx=501, expect=KL),
    Row("key limit: spend here and elsewhere", credits=RICH, klimit=1500, ks=250, kx=250),
    Row("key limit counts its holds", credits=RICH, klimit=1500, kh=501, holds=501, expect=KL),
    Row("other keys' holds do not count", credits=RICH, klimit=1500, holds=5000),
    Row("key limit zero", credits=RICH, klimit=0, expect=KL),
    Row("key limit zero, free request", credits=RICH, klimit=0, disc=10000),
    Row("key limit after the member limit", credits=RICH, klimit=0, dml=0, expect=M),
    # rate limits, each at, one over and one under what the request needs
    *[
        row
        for scope, log in (("k", K_LOG), ("m", M_LOG), ("t", T_LOG))
        for row in (
            Row(f"{scope} rpm at", credits=RICH, **{f"{scope}rpm": 3}),
            Row(f"{scope} rpm one over", credits=RICH, **{f"{scope}rpm": 4}),
            Row(
                f"{scope} rpm one under",
                credits=RICH,
                **{f"{scope}rpm": 2},
                expect=R,
                retry=(WINDOW_MS - log[0][0]) // S,
            ),
            Row(f"{scope} tpm at", credits=RICH, **{f"{scope}tpm": 160}),
            Row(f"{scope} tpm one over", credits=RICH, **{f"{scope}tpm": 161}),
            Row(
                f"{scope} tpm one under",
                credits=RICH,
                **{f"{scope}tpm": 159},
                expect=R,
                retry=(WINDOW_MS - log[0][0]) // S,
            ),
            Row(
                f"{scope} tpm both must leave",
                credits=RICH,
                **{f"{scope}tpm": 120},
                expect=R,
                retry=(WINDOW_MS - log[1][0]) // S,
            ),
        )
    ],
    # the window's edge: an entry stamped exactly 60 s ago no longer counts
    Row("entry exactly a window old is gone", credits=RICH, krpm=2, klog=((60_000, 30), (1, 30))),
    Row(
        "entry a millisecond younger counts",
        credits=RICH,
        krpm=2,
        klog=((59_999, 30), (1, 30)),
        expect=R,
        retry=1,
    ),
    Row(
        "tokens of aged entries are freed",
        credits=RICH,
        ktpm=100,
        klog=((70_000, 500), (60_000, 500)),
    ),
    Row(
        "retry rounds up to whole seconds",
        credits=RICH,
        krpm=1,
        klog=((58_500, 1),),
        expect=R,
        retry=2,
    ),
    Row(
        "retry is at least one second", credits=RICH, krpm=1, klog=((59_999, 1),), expect=R, retry=1
    ),
    Row("rpm zero refuses all", credits=RICH, krpm=0, klog=(), expect=R, retry=60),
    Row("tpm smaller than the request", credits=RICH, ktpm=99, klog=(), expect=R, retry=60),
    Row("tpm zero tokens fit tpm zero", credits=RICH, ktpm=0, klog=((1_000, 0),), tokens=0),
    Row(
        "tpm frees in order of age",
        credits=RICH,
        ktpm=250,
        tokens=100,
        klog=((50_000, 100), (40_000, 150), (30_000, 50)),
        expect=R,
        retry=20,
    ),
    # the account's clock never goes back: a later stamp elsewhere ages the log from there
    Row(
        "last stamp ahead ages entries",
        credits=RICH,
        krpm=2,
        last=2_000,
        klog=((58_500, 30), (1_000, 30)),
    ),
    Row(
        "last stamp ahead, retry from it",
        credits=RICH,
        krpm=2,
        last=500,
        klog=((58_000, 30), (1_000, 30)),
        expect=R,
        retry=2,
    ),
    Row(
        "last stamp behind is ignored",
        credits=RICH,
        krpm=2,
        last=-5_000,
        klog=((58_000, 30), (1_000, 30)),
        expect=R,
        retry=2,
    ),
    # several rate limits at once: Retry-After waits for every one of them
    Row("key and member rpm", credits=RICH, krpm=2, mrpm=2, expect=R, retry=30),
    Row("member and team tpm", credits=RICH, mtpm=120, ttpm=159, expect=R, retry=50),
    Row("rpm binds, tpm fits", credits=RICH, krpm=2, ktpm=1000, expect=R, retry=30),
    # soft warnings still travel with admitted rate-limited requests
    Row("soft warning and rpm", credits=RICH, dml=1000, den=SOFT, ms=1, krpm=3, warn=True),
]

# Two limits binding at once: the first of this order wins (money before rate); two rate limits
# give rate_limit_exceeded with the longer wait.
BINDING: list[tuple[str, dict[str, object], str]] = [
    ("expired", {"exp": NOW}, E),
    ("key model", {"models": ("gpt-4o",)}, A),
    ("blocked", {"blocked": True}, A),
    ("quota", {"credits": 999}, Q),
    ("team limit", {"limit": 999}, T),
    ("member limit", {"dml": 999}, M),
    ("key limit", {"klimit": 999}, KL),
    ("key rpm", {"krpm": 2}, R),
    ("key tpm", {"ktpm": 120}, R),
    ("member rpm", {"mrpm": 2}, R),
    ("member tpm", {"mtpm": 120}, R),
    ("team rpm", {"trpm": 2}, R),
    ("team tpm", {"ttpm": 120}, R),
]
_RETRY = {
    "key rpm": 30,
    "key tpm": 40,
    "member rpm": 15,
    "member tpm": 50,
    "team rpm": 10,
    "team tpm": 55,
}
PAIRS = [
    Row(
        f"{a} + {b}",
        **{"credits": RICH, **da, **db},  # type: ignore[arg-type]
        expect=ea,
        retry=max(_RETRY[a], _RETRY[b]) if ea == eb == R else _RETRY.get(a) if ea == R else None,
    )
    for (a, da, ea), (b, db, eb) in itertools.combinations(BINDING, 2)
]
ALL_DECISIONS = DECISIONS + CONTROLS + PAIRS

# charged, allowance, allowance spent -> from allowance, from credits
SPLITS = [
    (0, 0, 0, 0, 0),
    (100, 0, 0, 0, 100),
    (100, 1000, 0, 100, 0),
    (100, 1000, 950, 50, 50),
    (100, 1000, 1000, 0, 100),
    (100, 1000, 1500, 0, 100),
    (1000, 1000, 0, 1000, 0),
    (BIG, BIG - 1, 0, BIG - 1, 1),
]

# amount, discount bps -> charged (floor)
DISCOUNTS = [
    (4350, 0, 4350),
    (4350, 1000, 3915),
    (4350, 3333, 2900),  # 2900.145 rounds down
    (1, 1, 0),  # 0.9999
    (9999, 1, 9998),  # 9998.0001
    (10_000, 1, 9999),
    (12_345, 9999, 1),  # 1.2345
    (12_345, 10_000, 0),
    (0, 5000, 0),
    (BIG + 12_345, 3333, (BIG + 12_345) * 6667 // 10_000),
    (2**53 - 1, 1234, (2**53 - 1) * 8766 // 10_000),
]

# before, after, limit, soft, warned -> thresholds crossed
CROSSINGS = [
    (0, 799, 1000, False, False, ()),
    (0, 800, 1000, False, False, ("80",)),
    (799, 800, 1000, False, False, ("80",)),
    (800, 900, 1000, False, False, ()),
    (900, 1000, 1000, False, False, ("100",)),
    (0, 1000, 1000, False, False, ("80", "100")),
    (1000, 1200, 1000, False, False, ()),
    (0, 5000, 1000, False, False, ("80", "100")),
    (999, 1001, 1000, True, False, ("100", "exceeded")),
    (1000, 1001, 1000, True, False, ("exceeded",)),
    (1001, 1002, 1000, True, False, ()),
    (900, 950, 1000, True, True, ("exceeded",)),  # the hold warned
    (0, 0, 1000, True, True, ("exceeded",)),
    (0, 999, 1000, True, False, ("80",)),
    (0, 10, 0, False, False, ()),  # a zero limit is reached at zero: never crossed
    (0, 1, 0, True, False, ("exceeded",)),
    (0, 10, None, True, True, ()),
    (0, 10, -1, True, True, ()),
    (0, 1, 1, False, False, ("80", "100")),  # ceil(0.8) = 1
    (0, 7, 9, False, False, ()),  # 80 % of 9 is 7.2: reached at 8
    (7, 8, 9, False, False, ("80",)),
    (BIG, BIG + 1, BIG + 1, False, False, ("100",)),
]

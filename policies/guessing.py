"""Limits against guessing (passwords, invitation and link tokens) and against mass signups.

Every attempt is counted *before* it is checked, in buckets: per account and client address
(``pair``), per account, per client address. A bucket lets ``free`` attempts through; from the
``free``-th on, each attempt makes the next one wait, twice as long each time, up to ``max_wait_s``
(back-off). While any bucket of an attempt waits, the attempt is refused (429 with
``Retry-After``) *without being checked*, so a limited guess never tells whether it was right.
A count is forgotten ``window_s`` after the bucket's last attempt.

At login the pair bucket is tight and a success clears it: a stranger elsewhere who guesses
an owner's password only slows *their own* address down. The per-account bucket is looser and its
waits are short: it slows a distributed guess on one account without ever locking the owner out
for long. A success gives back its attempt to the account and address buckets (it was no
guess); signups never give back (each one costs an Argon2 hash).

Pure: ``guess.lua`` applies these rules in Redis, atomically, from the wait schedule built here
(:meth:`Rule.schedule`); ``tests/test_lua_parity.py`` checks it against :meth:`Rule.wait_after`.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a success does to a bucket: forget it, give back the attempt, or nothing.
CLEAR, REFUND, KEEP = "clear", "refund", "keep"
# Scopes of buckets.
PAIR, ACCOUNT, CLIENT = "pair", "account", "client"


@dataclass(frozen=True, slots=True)
class Rule:
    scope: str  # PAIR, ACCOUNT or CLIENT
    free: int  # attempts before the first wait
    first_wait_s: int
    max_wait_s: int
    window_s: int  # a count is forgotten this long after the bucket's last attempt
    on_success: str = REFUND

    def wait_after(self, attempts: int) -> int:
        """Seconds the bucket waits after its ``attempts``-th attempt (0: no wait)."""
        if attempts < self.free:
            return 0
        doublings = min(attempts - self.free, 32)
        return min(self.first_wait_s << doublings, self.max_wait_s)

    def schedule(self) -> tuple[int, ...]:
        """The waits after attempt ``free``, ``free + 1``, …; the last one repeats."""
        waits = [self.first_wait_s]
        while waits[-1] < self.max_wait_s:
            waits.append(min(waits[-1] * 2, self.max_wait_s))
        return tuple(waits)


HOUR = 3600
LOGIN = (
    Rule(PAIR, free=5, first_wait_s=2, max_wait_s=900, window_s=HOUR, on_success=CLEAR),
    Rule(ACCOUNT, free=50, first_wait_s=1, max_wait_s=30, window_s=HOUR),
    Rule(CLIENT, free=100, first_wait_s=2, max_wait_s=900, window_s=HOUR),
)
# Invitation and join-link tokens: the account is the user trying (absent for a bare lookup).
TOKENS = (
    Rule(ACCOUNT, free=10, first_wait_s=60, max_wait_s=900, window_s=HOUR),
    Rule(CLIENT, free=50, first_wait_s=60, max_wait_s=900, window_s=HOUR),
)


def signup_rule(per_hour: int) -> Rule:
    """Signups per client address: ``per_hour`` free, then a minute's wait, growing."""
    return Rule(
        CLIENT, free=per_hour, first_wait_s=60, max_wait_s=900, window_s=HOUR, on_success=KEEP
    )


RULES: dict[str, tuple[Rule, ...]] = {"login": LOGIN, "invite": TOKENS, "join": TOKENS}


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of an attempt: its rule and who it counts (the ids that make its key)."""

    kind: str
    rule: Rule
    ident: str


def buckets(kind: str, rules: tuple[Rule, ...], account: str | None, client: str) -> list[Bucket]:
    """The buckets an attempt of ``kind`` counts in; rules about an account are skipped without
    one."""
    found = []
    for rule in rules:
        if rule.scope == CLIENT:
            found.append(Bucket(kind, rule, client))
        elif account is not None:
            ident = account if rule.scope == ACCOUNT else f"{account}|{client}"
            found.append(Bucket(kind, rule, ident))
    return found


def retry_after(wait_ms: int) -> int:
    """``Retry-After`` seconds for a bucket that waits ``wait_ms`` more (at least 1)."""
    return max(1, -(-wait_ms // 1000))

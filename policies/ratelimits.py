"""Rate limits: requests (RPM) and tokens (TPM) per rolling 60 s, for a key, a member and a team.

The choice: a **sliding log**. Each limited scope keeps the requests it admitted as
``(stamp ms, tokens)`` entries — in Redis a sorted set per scope (member ``<request id>|<tokens>``,
score = stamp; policies/keyspace.py) — and ``hold.lua`` admits a request only if, counting every
entry stamped within the last 60 s, one more request stays within the RPM limit and the request's
worst-case tokens (prompt + output cap) stay within the TPM limit. Settling replaces the entry's
tokens by the actual ones (a failed request: 0) and corrects the sum by the difference; nothing
to do when they are the same.

The Redis form. Beside each log, the account's state hash keeps what the hold needs of it, read
in the HMGET the hold makes of that hash anyway: its entry count, its oldest stamp, its token sum
(``rc:<log>``, ``rs:<log>``). So a hold whose log has nothing to trim adds one ZADD per log and
one HSET for them all; only when the oldest entry has aged out does it read the log's head (a
page of entries) and trim it. These fields are kept in step with the set: every script that
adds, removes or rewrites a member updates them in the same atomic step; trimming subtracts each
removed member's own tokens; settle and release rewrite a member at its score (the hold keeps
the stamp in its own value, ``<tokens>@<stamp>``) and correct the sum only when the member is
still there. Where the fields are missing (the log's first request, or a state hash lost without
its logs) the hold counts them from the log; a reload of the account (load.lua) keeps them. A log
expires two windows after its last PEXPIRE, which the hold sends when the log starts and again
once half a window has passed: the log outlives its newest entry by at least a window and a half,
so it is gone only when all its entries have aged out — and the next hold, finding the oldest
stamp aged out and no entries, counts from nothing. (A rolling upgrade from the version that kept
these logs under ``rw:`` names with the sums in a hash ``rt`` counts the two versions' requests in
separate logs: until the last old replica stops, each version holds the limit on its own.)

Why not GCRA: GCRA with a burst of N per 60 s admits N at once and then one every 60/N s, so some
60 s windows hold almost 2 N requests. A fixed window has the same 2 N at its edges. The sliding
log is the only one of the three that bounds *every* 60 s window, which is what the contract
promises; its cost is one entry per admitted request of a limited scope (at most RPM entries, or
TPM / tokens per request), trimmed as they age out: amortised O(log n) per request.

Exactness. Write W = 60 000 ms. The stamps come from the gateway's clock, made monotonic per
billing account: the script stamps a request ``t = max(now, last)``, where ``last`` is the
largest stamp any earlier script call on the account used, and records ``last = t``. Redis runs
scripts one at a time, so stamps never decrease in the order requests are admitted. At its
admission a request counts the entries with stamps in ``(t - W, t]``; entries at or before
``t - W`` are trimmed, and since later stamps are never smaller, a trimmed entry is never needed
again. Now take any 60 s span ``[a, a + W)`` and the entries stamped in it, and let ``r`` be
the one admitted last, stamped ``t``. Every other entry ``e`` in the span was admitted before
``r``, and ``a <= stamp(e) <= t < a + W``, so ``stamp(e) > t - W``: ``r`` counted all of them
(with their tokens corrected down or still at the worst case, never below the actual ones).
``r`` was admitted only if their count plus one was at most RPM and their tokens plus its own
worst case at most TPM; after ``r``, the span holds nothing else, so no span ever holds more than
RPM requests or, counting worst cases until settle and actual tokens after, more than TPM tokens.
Conversely a request is refused only when the entries of the last 60 s leave no room, so with
``rpm: N`` and any number of requests arriving at once, from any number of processes, exactly N
are admitted. Clocks of different gateway hosts only shift stamps forward to the fastest clock
(the max); a request in flight between its stamp and its script is counted at its stamp.

Only the scopes that have a limit keep a log, so a key, a member or a team pays nothing until it
has one, and a limit set now counts the requests admitted from now on.

Retry-After is the time until enough of the counted entries leave the window for the refused
request to fit, in whole seconds rounded up (at least 1); a request that can never fit (RPM 0, or
more worst-case tokens than the TPM limit) gets the whole window. The ``x-ratelimit-*`` headers
describe the tightest limit (least remaining, then the smallest limit, then key before member
before team); ``reset`` is the time until the oldest counted entry leaves the window, i.e. until
``remaining`` next grows.

``hold.lua`` mirrors these functions; the parity tests run one table through both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WINDOW_MS = 60_000
#: the sorted sets and the sums of an idle scope expire after this long (> the window)
STATE_TTL_MS = 2 * WINDOW_MS


@dataclass(frozen=True, slots=True)
class Window:
    """One scope's limits and the entries of its log, ``(stamp ms, tokens)`` oldest first (may
    include entries that have aged out: :func:`live` drops them)."""

    rpm: int | None = None
    tpm: int | None = None
    entries: tuple[tuple[int, int], ...] = ()

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None


# Usage and RateView are built for a rate-limited key's refusals, errors and aiohttp's path (the
# lean front renders the hold's figures directly: gateway/proxy/ratelines.py): slots, not frozen
# (a frozen __init__ sets each field through object.__setattr__, three times the instructions).
@dataclass(slots=True)
class Usage:
    """The tightest limit of one kind: what ``x-ratelimit-{limit,remaining,reset}-*`` say."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(slots=True)
class RateView:
    requests: Usage | None
    tokens: Usage | None


def stamp(now_ms: int, last_ms: int) -> int:
    """The stamp of a request: the gateway's clock, never below the account's last stamp."""
    return max(now_ms, last_ms)


def live(window: Window, now: int) -> tuple[tuple[int, int], ...]:
    """The entries still counted at ``now``: stamped after ``now - WINDOW_MS``."""
    cutoff = now - WINDOW_MS
    return tuple(e for e in window.entries if e[0] > cutoff)


def _wait_requests(rpm: int, entries: Sequence[tuple[int, int]], now: int) -> int:
    if rpm <= 0:
        return WINDOW_MS
    # count + 1 - rpm entries must leave: the last of them is entries[count - rpm]
    return entries[len(entries) - rpm][0] + WINDOW_MS - now


def _wait_tokens(tpm: int, entries: Sequence[tuple[int, int]], now: int, tokens: int) -> int:
    if tokens > tpm:
        return WINDOW_MS
    excess = sum(t for _, t in entries) + tokens - tpm
    for at, t in entries:
        excess -= t
        if excess <= 0:
            return at + WINDOW_MS - now
    return WINDOW_MS  # unreachable: with every entry gone, tokens <= tpm fits


def retry_after(windows: Sequence[Window], now: int, tokens: int) -> int | None:
    """None when one more request of ``tokens`` fits every window at ``now`` (a stamp), else the
    whole seconds (>= 1) until it would fit all of them."""
    wait = -1
    for window in windows:
        entries = live(window, now)
        if window.rpm is not None and len(entries) + 1 > window.rpm:
            wait = max(wait, _wait_requests(window.rpm, entries, now))
        if window.tpm is not None and sum(t for _, t in entries) + tokens > window.tpm:
            wait = max(wait, _wait_tokens(window.tpm, entries, now, tokens))
    if wait < 0:
        return None
    return max(1, -(-wait // 1000))


def _reset(entries: Sequence[tuple[int, int]], now: int) -> int:
    return entries[0][0] + WINDOW_MS - now if entries else 0


def view(windows: Sequence[Window], now: int, tokens: int, admitted: bool) -> RateView | None:
    """The headers' figures: for requests and for tokens, the limit with the least remaining
    (then the smallest limit, then the first of ``windows``), counting the request itself when
    it was admitted. None when no window is limited."""
    requests: Usage | None = None
    token_usage: Usage | None = None
    for window in windows:
        if not window.limited:
            continue
        entries = live(window, now)
        if admitted:
            entries = (*entries, (now, tokens))
        reset = _reset(entries, now)
        if window.rpm is not None:
            usage = Usage(window.rpm, max(0, window.rpm - len(entries)), reset)
            if requests is None or (usage.remaining, usage.limit) < (
                requests.remaining,
                requests.limit,
            ):
                requests = usage
        if window.tpm is not None:
            left = max(0, window.tpm - sum(t for _, t in entries))
            usage = Usage(window.tpm, left, reset)
            if token_usage is None or (usage.remaining, usage.limit) < (
                token_usage.remaining,
                token_usage.limit,
            ):
                token_usage = usage
    if requests is None and token_usage is None:
        return None
    return RateView(requests, token_usage)


def format_reset(ms: int) -> str:
    """OpenAI's duration form of ``x-ratelimit-reset-*``: ``120ms``, ``1.5s``, ``1m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds, millis = divmod(rest, 1000)  # integers: no float formatting (once per answer)
    text = f"{seconds}.{millis:03d}".rstrip("0") + "s" if millis else f"{seconds}s"
    return f"{minutes}m{text}" if minutes else text


def headers(rate: RateView) -> dict[str, str]:
    out: dict[str, str] = {}
    requests, tokens = rate.requests, rate.tokens
    reset = ""
    if requests is not None:
        reset = format_reset(requests.reset_ms)
        out["x-ratelimit-limit-requests"] = str(requests.limit)
        out["x-ratelimit-remaining-requests"] = str(requests.remaining)
        out["x-ratelimit-reset-requests"] = reset
    if tokens is not None:
        if requests is None or tokens.reset_ms != requests.reset_ms:  # mostly the same window
            reset = format_reset(tokens.reset_ms)
        out["x-ratelimit-limit-tokens"] = str(tokens.limit)
        out["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
        out["x-ratelimit-reset-tokens"] = reset
    return out

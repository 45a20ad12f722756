"""Limits against guessing: passwords at login, invitation tokens, invite-link tokens.

Failures are counted in Redis per account (an email or user id) and per client address over a
window; once either count reaches its cap, further attempts get 429 ``rate_limited`` with
``Retry-After`` until the window ends. Successes do not reset the count (so an attacker cannot
interleave a known-good attempt).
"""

from __future__ import annotations

from aiohttp import web

from gateway import state as S
from gateway.errors import RateLimited

WINDOW_S = 300
MAX_PER_ACCOUNT = 10
MAX_PER_ADDRESS = 50


async def check(request: web.Request, kind: str, account: str | None) -> list[str]:
    """Raise 429 when ``kind`` failed too often for this account or address; return the
    counters to bump on a failure."""
    buckets = [f"mb:{kind}:ip:{request.remote or '-'}"]
    limits = [MAX_PER_ADDRESS]
    if account is not None:
        buckets.append(f"mb:{kind}:acct:{account.lower()}")
        limits.append(MAX_PER_ACCOUNT)
    counts = await request.app[S.REDIS].mget(buckets)
    if any(int(c or 0) >= limit for c, limit in zip(counts, limits, strict=True)):
        raise RateLimited(
            "too many failed attempts; try again in a few minutes",
            headers={"Retry-After": str(WINDOW_S)},
        )
    return buckets


async def record_failure(request: web.Request, buckets: list[str]) -> None:
    pipe = request.app[S.REDIS].pipeline(transaction=False)
    for bucket in buckets:
        pipe.incr(bucket)
        pipe.expire(bucket, WINDOW_S, nx=True)
    await pipe.execute()

"""Limits against guessing — passwords at login, invitation and link tokens — and mass signups.

The rules are :mod:`policies.guessing`'s (buckets per account and client address, per account, per
address; back-off); ``guess.lua`` applies them in one Redis step. Use::

    attempt = await guessing.attempt(request, "login", account)  # 429 while a bucket waits
    ... check the password ...
    await guessing.succeeded(request, attempt)                   # only when it was right

or ``async with guessing.guarded(request, "invite", user.id, NotFound): ...`` where an exception
of the given types is the failed guess.

The client address is :func:`gateway.api.common.client_address` (``server.trusted_proxies``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from redis.exceptions import NoScriptError

from gateway import state as S
from gateway.api.common import client_address
from gateway.errors import RateLimited
from gateway.metering.scripts import lua_source
from policies import guessing
from policies import keyspace as rk


@dataclass(frozen=True, slots=True)
class Attempt:
    """An attempt counted in its buckets (what :func:`succeeded` gives back)."""

    keys: list[str]
    args: list[str]  # guess.lua's, per bucket


@functools.cache
def _script() -> tuple[str, str]:
    source = lua_source("guess")
    return source, hashlib.sha1(source.encode()).hexdigest()


async def _run(request: web.Request, keys: list[str], args: list[str]) -> list[int]:
    redis = request.app[S.REDIS]
    source, sha = _script()
    try:
        result = await redis.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        result = await redis.eval(source, len(keys), *keys, *args)
    return [int(x) for x in result]


def _args(rule: guessing.Rule) -> list[str]:
    waits = ",".join(str(w) for w in rule.schedule())
    return [str(rule.free), str(rule.window_s), rule.on_success, waits]


async def attempt(
    request: web.Request,
    kind: str,
    account: str | None,
    rules: tuple[guessing.Rule, ...] | None = None,
) -> Attempt:
    """Count an attempt of ``kind`` for ``account`` (an id; None when there is none) from this
    client; raise 429 ``rate_limited`` with ``Retry-After`` while one of its buckets waits."""
    found = guessing.buckets(kind, rules or guessing.RULES[kind], account, client_address(request))
    keys: list[str] = []
    args: list[str] = []
    for bucket in found:
        keys += rk.guess_keys(kind, bucket.rule.scope, bucket.ident)
        args += _args(bucket.rule)
    done = Attempt(keys, args)
    if not keys:
        return done
    allowed, wait_ms = await _run(request, keys, ["try", *args])
    if not allowed:
        raise RateLimited(
            "too many attempts; try again later",
            headers={"Retry-After": str(guessing.retry_after(wait_ms))},
        )
    return done


async def succeeded(request: web.Request, done: Attempt) -> None:
    """The attempt was right: clear or give back what it counted, as its rules say."""
    if done.keys:
        await _run(request, done.keys, ["ok", *done.args])


@contextlib.asynccontextmanager
async def guarded(
    request: web.Request,
    kind: str,
    account: str | None,
    *failures: type[BaseException],
) -> AsyncIterator[None]:
    """Count an attempt around the block; one that raises none of ``failures`` was no guess."""
    done = await attempt(request, kind, account)
    try:
        yield
    except failures:
        raise
    except Exception:
        with contextlib.suppress(Exception):
            await succeeded(request, done)
        raise
    await succeeded(request, done)

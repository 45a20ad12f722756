"""The ``x-ratelimit-*`` headers of a held request, as the lean front writes them in its heads.

Every answer of a rate-limited key carries them (contract section 10), so they are rendered
straight from the hold's reply figures (:attr:`gateway.metering.meter.HoldResult.figures`) in
one string build: no :class:`~policies.ratelimits.RateView`, no dict, no line per header; a
limit's line is formatted once per limit value, and a reset under a minute (the usual one) is
looked up in parts rather than formatted. Names, values and order are those of
:func:`policies.ratelimits.headers` (which aiohttp's path and the error answers use;
``tests/test_ratelines.py`` holds the two together).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.ratelimits import format_reset

# format_reset's text under a minute: _MILLIS[ms] under a second, else
# _SECONDS[ms // 1000] + _FRACTIONS[ms % 1000] ("4" + ".321s", "4" + "s", "12" + ".5s")
_MILLIS = tuple(f"{ms}ms" for ms in range(1000))
_SECONDS = tuple(str(seconds) for seconds in range(60))
_FRACTIONS = ("s", *(f".{ms:03d}".rstrip("0") + "s" for ms in range(1, 1000)))

# A limit's line and the next one's name, by limit value (a few distinct values; bounded anyway).
# The tokens' begin a line: they follow the requests' reset.
_LIMITS_MAX = 10_000
_REQUESTS: dict[int, str] = {}
_TOKENS: dict[int, str] = {}


def reset_text(ms: int) -> str:
    """:func:`policies.ratelimits.format_reset`, looked up under a minute."""
    if 1000 <= ms < 60_000:
        return _SECONDS[ms // 1000] + _FRACTIONS[ms % 1000]
    if 0 <= ms < 1000:
        return _MILLIS[ms]
    return format_reset(ms)  # a whole window (the first request of one), or below 0


def _line(cache: dict[int, str], template: str, limit: int) -> str:
    """``template`` with ``limit`` in it, kept in ``cache`` (cleared when full)."""
    if len(cache) >= _LIMITS_MAX:
        cache.clear()
    line = cache[limit] = template.format(limit)
    return line


def _requests(limit: int) -> str:
    return _line(
        _REQUESTS, "x-ratelimit-limit-requests: {}\r\nx-ratelimit-remaining-requests: ", limit
    )


def _tokens(limit: int) -> str:
    return _line(
        _TOKENS, "\r\nx-ratelimit-limit-tokens: {}\r\nx-ratelimit-remaining-tokens: ", limit
    )


def lines(figures: Sequence[int]) -> str:
    """The header lines (``name: value``, joined by CRLF, none after the last) of a hold's
    figures: limit, remaining, reset ms for requests, then for tokens (a limit < 0: none)."""
    limit_r, left_r, reset_r, limit_t, left_t, reset_t = figures
    if limit_r < 0:
        if limit_t < 0:
            return ""
        try:
            tokens = _TOKENS[limit_t]
        except KeyError:
            tokens = _tokens(limit_t)
        return f"{tokens[2:]}{left_t}\r\nx-ratelimit-reset-tokens: {reset_text(reset_t)}"
    try:
        requests = _REQUESTS[limit_r]
    except KeyError:
        requests = _requests(limit_r)
    if 1000 <= reset_r < 60_000:  # inline reset_text, the usual case
        reset = _SECONDS[reset_r // 1000] + _FRACTIONS[reset_r % 1000]
    else:
        reset = reset_text(reset_r)
    if limit_t < 0:
        return f"{requests}{left_r}\r\nx-ratelimit-reset-requests: {reset}"
    try:
        tokens = _TOKENS[limit_t]
    except KeyError:
        tokens = _tokens(limit_t)
    if reset_t != reset_r:  # another scope's limit is the tightest for tokens
        return (
            f"{requests}{left_r}\r\nx-ratelimit-reset-requests: {reset}"
            f"{tokens}{left_t}\r\nx-ratelimit-reset-tokens: {reset_text(reset_t)}"
        )
    return (
        f"{requests}{left_r}\r\nx-ratelimit-reset-requests: {reset}"
        f"{tokens}{left_t}\r\nx-ratelimit-reset-tokens: {reset}"
    )

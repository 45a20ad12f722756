"""Money as integer nano-dollars (1e-9 USD), parsed from and formatted to decimal strings.

No float ever becomes a balance: JSON numbers are read through their decimal text, and anything
that is not a whole number of nano-dollars is refused.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
#: per-token prices are configured per 1M tokens: nanos/token = usd_per_mtok * 1e9 / 1e6
NANOS_PER_TOKEN_PER_USD_PER_MTOK = 1_000
MAX_NANOS = 2**62  # far beyond any balance; keeps every Redis INCRBY exact


class MoneyError(ValueError):
    """A money value that is not a valid amount."""


def to_decimal(value: object) -> Decimal:
    """Read a decimal from a string, int or (JSON) float through its shortest text form."""
    if isinstance(value, bool) or value is None:
        raise MoneyError("expected a decimal amount")
    if isinstance(value, float):
        value = repr(value)
    if not isinstance(value, str | int | Decimal):
        raise MoneyError("expected a decimal amount")
    try:
        dec = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise MoneyError(f"not a decimal amount: {value!r}") from exc
    if not dec.is_finite():
        raise MoneyError("amount must be finite")
    return dec


def parse_usd(value: object, *, allow_negative: bool = False) -> int:
    """``"12.5"`` -> 12_500_000_000 nano-dollars. At most 9 decimals."""
    dec = to_decimal(value)
    nanos = dec * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise MoneyError("amount has more than 9 decimal places")
    result = int(nanos)
    if result < 0 and not allow_negative:
        raise MoneyError("amount must not be negative")
    if abs(result) > MAX_NANOS:
        raise MoneyError("amount too large")
    return result


def format_usd(nanos: int) -> str:
    """12_500_000_000 -> ``"12.500000000"`` (always 9 decimals, exact)."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(int(nanos)), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def format_optional_usd(nanos: int | None) -> str | None:
    return None if nanos is None else format_usd(nanos)


def price_per_token(usd_per_mtok: object) -> int:
    """USD per 1M tokens -> nano-dollars per token; refuses fractions of a nano-dollar."""
    dec = to_decimal(usd_per_mtok)
    nanos = dec * NANOS_PER_TOKEN_PER_USD_PER_MTOK
    if nanos != nanos.to_integral_value():
        raise MoneyError(
            f"price {usd_per_mtok} per 1M tokens is not a whole number of nano-dollars per token "
            "(at most 3 decimals)"
        )
    if nanos < 0:
        raise MoneyError("price must not be negative")
    return int(nanos)

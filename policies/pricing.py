"""What a request costs, in nano-dollars.

``list cost = uncached_prompt * input + cached * cached_input + cache_writes * cache_write
+ completion * output``
``charged   = list * (10000 - discount_bps) // 10000`` (rounded down, in the customer's favour)

The hold placed before a request goes upstream is the same formula at its worst case: every prompt
token at the dearest input price (uncached, or a cache write where that costs more), and the full
``max_tokens`` (or the model's ``max_output_tokens``) of output.

Cache writes are Anthropic's ``cache_creation_input_tokens``; a model without
``cache_write_per_mtok`` prices them at its input price.
"""

from __future__ import annotations

from dataclasses import dataclass

BPS_DENOMINATOR = 10_000


@dataclass(frozen=True, slots=True)
class Prices:
    """Nano-dollars per token."""

    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None

    @property
    def dearest_input(self) -> int:
        """The most one prompt token can cost (what the hold assumes)."""
        return max(self.input, self.cache_write if self.cache_write is not None else 0)


@dataclass(frozen=True, slots=True)
class Charge:
    list_cost: int
    discount: int
    charged: int


def list_cost(
    prices: Prices,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> int:
    """Cost before discount. Cached (cache-read) and cache-write tokens are part of
    ``prompt_tokens`` (as OpenAI reports; Anthropic's three input counts summed)."""
    prompt_tokens = max(0, prompt_tokens)
    completion_tokens = max(0, completion_tokens)
    writes = min(max(0, cache_write_tokens), prompt_tokens)
    cached = min(max(0, cached_tokens), prompt_tokens - writes)
    cached_price = prices.cached_input if prices.cached_input is not None else prices.input
    write_price = prices.cache_write if prices.cache_write is not None else prices.input
    return (
        (prompt_tokens - cached - writes) * prices.input
        + cached * cached_price
        + writes * write_price
        + completion_tokens * prices.output
    )


def apply_discount(amount: int, discount_bps: int) -> int:
    """Floor of ``amount * (10000 - bps) / 10000``."""
    bps = min(max(0, discount_bps), BPS_DENOMINATOR)
    return amount * (BPS_DENOMINATOR - bps) // BPS_DENOMINATOR


def charge(list_amount: int, discount_bps: int) -> Charge:
    charged = apply_discount(list_amount, discount_bps)
    return Charge(list_cost=list_amount, discount=list_amount - charged, charged=charged)


def worst_case_list_cost(prices: Prices, prompt_tokens: int, max_output_tokens: int) -> int:
    """List cost of the hold: all prompt tokens at the dearest input price, all output used."""
    return max(0, prompt_tokens) * prices.dearest_input + max(0, max_output_tokens) * prices.output


def requested_output_cap(body: dict[str, object], model_max_output: int) -> int:
    """The output tokens a request may use: ``max_completion_tokens`` or ``max_tokens`` when the
    request names one, else the model's ``max_output_tokens``; times ``n`` choices."""
    cap = model_max_output
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            cap = value
            break
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        cap *= choices
    return cap

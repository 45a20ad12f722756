"""Subscriptions: what a change of plan or seats does to this period's allowance and invoice.

A subscription of ``seats`` on a plan gives ``seats * included_usage_per_seat`` of allowance per
period and costs ``seats * seat_price`` per period (recorded as invoice lines, no payment
processing). A change takes effect at once where it gives more, at the next period where it gives
less:

* this period's allowance becomes ``max(period allowance, new allowance)`` — raising seats adds
  the difference now; lowering them (or a cheaper plan) leaves this period as it is;
* this period's invoice gets ``max(0, new cost - invoiced this period)`` — raising seats records
  the added seats' price; after a lowering, raising back up to what was paid costs nothing;
* the next period starts from the new subscription (allowance and renewal line).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SEATS = 100_000


@dataclass(frozen=True, slots=True)
class Change:
    allowance_delta: int  # added to this period's allowance now
    invoice_amount: int  # recorded on this period's invoice now
    period_allowance: int  # this period's allowance after the change


def seat_allowance(included_usage_per_seat: int, seats: int) -> int:
    return included_usage_per_seat * max(0, seats)


def seat_cost(seat_price: int, seats: int) -> int:
    return seat_price * max(0, seats)


def change(period_allowance: int, invoiced: int, new_allowance: int, new_cost: int) -> Change:
    """The effect on this period of moving to a subscription worth ``new_allowance`` per period
    and costing ``new_cost``, given what this period was granted and invoiced so far."""
    delta = max(0, new_allowance - period_allowance)
    return Change(
        allowance_delta=delta,
        invoice_amount=max(0, new_cost - invoiced),
        period_allowance=period_allowance + delta,
    )


def line_seats(
    old_plan: str | None, new_plan: str, seats: int, amount: int, seat_price: int
) -> int:
    """Seats an invoice line pays for: on the same plan, the seats its amount buys (the added
    ones); on a new plan, the whole subscription."""
    if old_plan != new_plan or seat_price <= 0:
        return seats
    return min(seats, -(-amount // seat_price))

"""The recent settles a process keeps to send again (gateway/metering/recent.py): the window,
the bound, and the resettle.lua calls they make."""

from __future__ import annotations

from gateway.metering.journal import SettleCall
from gateway.metering.recent import RecentSettles, kept_record, record_of, resettle_calls
from policies import keyspace as rk
from policies.usage_record import fields_of, opened_of


def call(request_id: str = "req_1", account: str = "t_a") -> SettleCall:
    """A settle.lua call: ten arguments, then the record."""
    args: list[str | int] = [request_id, 4350, "u1", "k1", "m", 1, 2, 0, 0, 11]
    return SettleCall(account, request_id, [], [*args, opened_of({"request_id": request_id})])


def test_the_record_is_the_one_settle_lua_appended() -> None:
    head = opened_of({"request_id": "req_1"})
    assert record_of(call(), 350, 4000) == ["r", head + ",350,4000]"]
    assert kept_record(call()) == ["r", head + ",0,4350]"]
    fields = fields_of({"r": kept_record(call())[1]})
    assert (fields["request_id"], fields["from_allowance"], fields["from_credits"]) == (
        "req_1",
        0,
        4350,
    )


def test_window_counts_only_time_redis_was_seen() -> None:
    recent = RecentSettles(window_s=30, max_entries=10)
    recent.add(call("req_1"), 0, 4350, now=100.0)
    recent.add(call("req_2"), 0, 4350, now=120.0)
    recent.prune(now=129.0)
    assert [e.request_id for e in recent.entries] == ["req_1", "req_2"]
    recent.pause(60.0)  # Redis away for a minute: not counted
    recent.prune(now=189.0)
    assert [e.request_id for e in recent.entries] == ["req_1", "req_2"]
    recent.prune(now=190.5)
    assert [e.request_id for e in recent.entries] == ["req_2"]
    assert str(recent.entries[0].record[-1]).endswith(",0,4350]")


def test_at_most_max_entries_the_oldest_go_first() -> None:
    recent = RecentSettles(window_s=30, max_entries=3)
    for i in range(5):
        recent.add(call(f"req_{i}"), 0, 1, now=float(i))
    assert [e.request_id for e in recent.entries] == ["req_2", "req_3", "req_4"]
    assert [e.request_id for e in recent.of_slots({0}, lambda _: 0)] == ["req_2", "req_3", "req_4"]
    assert recent.of_slots({1}, lambda _: 0) == []


def test_resettle_calls_one_account_a_bounded_batch_each() -> None:
    ak = rk.AccountKeys("t_a")
    items = [(f"req_{i}", ["request_id", f"req_{i}"]) for i in range(3)]
    calls = resettle_calls("t_a", items, per_call=2)
    head = [ak.state, ak.hold_expiry, ak.hold_values, ak.usage_stream]
    assert calls == [
        (
            [*head, ak.settled_marker("req_0"), ak.settled_marker("req_1")],
            [rk.RID_TTL_S, "req_0", 2, "request_id", "req_0", "req_1", 2, "request_id", "req_1"],
        ),
        ([*head, ak.settled_marker("req_2")], [rk.RID_TTL_S, "req_2", 2, "request_id", "req_2"]),
    ]

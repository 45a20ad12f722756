"""A usage record as the usage stream holds it, and the one place its entries are read back.

Since issue 14 a record is one stream field, ``r``, whose value is the record's values as a JSON
array in the order of :data:`FIELDS`::

    r  ["req_…","t_…","team_…","usr_…","key_…","gpt-4o-mini","/v1/chat/completions","2026-11",
        46,6,0,10500,0,10500,"upstream","o200k_base","",200,1795000000000,"gpt-4o-mini",1,0,10500]

The gateway sends ``settle.lua`` the array of :data:`NAMES`' values *not closed*
(:func:`opened`); the script appends the split it computed, ``,<from_allowance>,<from_credits>]``
(:func:`closed` is the same in Python, for the records sent again: gateway/metering/recent.py).
One field instead of 23 field/value pairs (issue 14, counted by callgrind): settle.lua as the
gateway calls it 441,000 -> 324,000 instructions, the writer's XREADGROUP 52,000 -> 25,000 per
record. The split as two more fields (``a``, ``c``) instead of appended costs the settle the same
(323,000) and the read 2,400 more. JSON keeps it unambiguous whatever a value holds.

Before, a record was its field/value pairs (``request_id``, ``req_…``, …, ``from_allowance``,
…, ``from_credits``, …; ``served_model`` and ``attempts`` only when routed). Such entries may
still sit in a stream or a settle journal during an upgrade: :func:`fields_of` reads both forms,
and :func:`opened_of` turns an old settle's pairs into the new argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

RECORD = "r"  # the stream field holding the record
NAMES = (
    "request_id",
    "account",
    "team_id",
    "user_id",
    "key_id",
    "model",
    "endpoint",
    "period",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "list_cost",
    "discount",
    "charged",
    "usage_source",
    "encoding",
    "tags",
    "status",
    "created_at",
    "served_model",  # "" when not routed: the requested model served it
    "attempts",
)
SPLIT = ("from_allowance", "from_credits")  # appended by settle.lua
FIELDS = NAMES + SPLIT
# the fields whose values are integers (the rest are strings)
INTEGERS = frozenset((*FIELDS[8:14], "status", "created_at", "attempts", *SPLIT))
# an old record's values when it lacked the field (not routed: served_model, attempts)
_ABSENT: dict[str, str | int] = {"served_model": "", "attempts": 1}

Value = str | int
Fields = Mapping[str, Value]


def opened(values: Sequence[Value]) -> str:
    """``settle.lua``'s ARGV[11]: the values of :data:`NAMES`, in order, as a JSON array not
    closed (the script appends the split and the bracket)."""
    return orjson.dumps(values)[:-1].decode()


def closed(opened: str, from_allowance: int, from_credits: int) -> str:
    """The value of the stream's ``r`` field ``settle.lua`` appends for ``opened`` and this split
    (its ``str()`` of an integer is Python's)."""
    return f"{opened},{from_allowance},{from_credits}]"


def opened_of(fields: Mapping[str, Any]) -> str:
    """:func:`opened` of a record given by name (an old settle's field/value pairs, a test's few
    fields): what it lacks is empty, or zero for a count; counts given as strings are made
    integers."""
    values: list[Value] = []
    for name in NAMES:
        value = fields.get(name, _ABSENT.get(name, ""))
        values.append(int(value or 0) if name in INTEGERS else value)
    return opened(values)


def stream_entry(fields: Mapping[str, Any]) -> dict[str, str]:
    """The stream entry ``settle.lua`` appends for a record given by name, split included."""
    split = (int(fields.get(name) or 0) for name in SPLIT)
    return {RECORD: closed(opened_of(fields), *split)}


def pairs_dict(pairs: Sequence[Any]) -> dict[str, Any]:
    """``[field, value, field, value, …]`` -> ``{field: value}``."""
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def fields_of(entry: Mapping[str, Any]) -> Fields:
    """A usage stream entry's fields -> the record by field name, whichever form it was appended
    in (the one reader of both; an old entry is returned as it is: its values are strings, a new
    one's counts are integers). ValueError for an ``r`` that is not a record."""
    payload = entry.get(RECORD)
    if payload is None:
        return entry
    values = orjson.loads(payload)
    if not isinstance(values, list) or len(values) != len(FIELDS):
        raise ValueError(f"not a usage record: {payload[:200]!r}")
    return dict(zip(FIELDS, values, strict=True))

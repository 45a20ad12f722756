"""A usage record's row in PostgreSQL: the columns of ``usage_records``, a stream entry's fields
(either form: policies/usage_record.py) converted to them, the writer's statements that insert a
batch of rows with their daily rollup (usage_daily) and the keys' last use, and the arguments of
``ack.lua`` once they are in (gateway/metering/usage_writer.py runs them)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from policies import keyspace as rk
from policies.periods import is_period
from policies.usage_record import RECORD, Fields, Value, fields_of

# The values come as an entry's fields have them (policies/usage_record.py): all strings in an
# entry of the old form, the counts integers in one of the new.


def _integer(value: Value) -> int:
    return int(value or 0)


def _team(value: Value) -> str | None:
    return str(value) if value else None


def _tags(value: Value) -> list[str]:
    return [t for t in str(value).split(",") if t] if value else []


def _created(value: Value) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, UTC)


def _text(value: Value) -> str:
    return str(value)


def _period(value: Value) -> str:
    # the period counters (Redis's, the ledger's sums) are keyed by it: an empty or malformed
    # one is refused (ValueError: the record goes to usage_rejects, whole), as entry_of does
    if not is_period(value):
        raise ValueError(f"not a period (YYYY-MM): {str(value)[:40]!r}")
    return str(value)


def _attempts(value: Value) -> int:
    return int(value or 1)  # a record from before routing: one attempt


# The columns of usage_records a record fills, in order, each with what makes its value of the
# stream entry's field: the one list COLUMNS, record_row and INSERT_ROWS's array types come from.
_CONVERT: tuple[tuple[str, Callable[[Value], Any]], ...] = (
    ("request_id", _text),
    ("account", _text),
    ("team_id", _team),
    ("user_id", _text),
    ("key_id", _text),
    ("model", _text),
    ("endpoint", _text),
    ("period", _period),
    ("prompt_tokens", _integer),
    ("completion_tokens", _integer),
    ("cached_tokens", _integer),
    ("list_cost", _integer),
    ("discount", _integer),
    ("charged", _integer),
    ("from_allowance", _integer),
    ("from_credits", _integer),
    ("usage_source", _text),
    ("encoding", _text),
    ("tags", _tags),
    ("status", _integer),
    ("served_model", _text),
    ("attempts", _attempts),
    ("created_at", _created),  # created_at last: _insert reads row[-1]
)
COLUMNS = tuple(column for column, _ in _CONVERT)
# INSERT_ROWS's parameter of each column: text[] unless said here (tags go comma-joined)
_ARRAYS: dict[Callable[[Value], Any], str] = {
    _integer: "bigint[]",
    _attempts: "bigint[]",
    _created: "timestamptz[]",
}

# A batch goes in by COPY into a temporary table (emptied at commit), then one statement inserts
# the rows not there yet and adds only those actually inserted to their day's rollup
# (usage_daily), grouped, in one order (concurrent batches cannot deadlock). Measured against
# executemany of one row at a time and a multi-row INSERT from unnest(): bench/drain.py, README.
BATCH_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_batch (LIKE usage_records INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)
_ROLLUP = (
    "INSERT INTO usage_daily AS d SELECT account, (created_at AT TIME ZONE 'UTC')::date AS day, "
    "user_id, key_id, model, tags, count(*), sum(prompt_tokens), sum(completion_tokens), "
    "sum(list_cost), sum(discount), sum(charged) FROM new GROUP BY 1, 2, 3, 4, 5, 6 "
    "ORDER BY 1, 2, 3, 4, 5, 6 "
    "ON CONFLICT (account, day, user_id, key_id, model, tags) DO UPDATE SET "
    "requests = d.requests + excluded.requests, "
    "prompt_tokens = d.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = d.completion_tokens + excluded.completion_tokens, "
    "list_cost = d.list_cost + excluded.list_cost, discount = d.discount + excluded.discount, "
    "charged = d.charged + excluded.charged"
)
INSERT_BATCH = (
    f"WITH new AS (INSERT INTO usage_records ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM usage_batch ORDER BY request_id "
    f"ON CONFLICT DO NOTHING RETURNING *) {_ROLLUP}"
)
_LAST_USED_FROM = (
    "UPDATE api_keys k SET last_used_at = greatest(coalesce(k.last_used_at, u.at), u.at) "
    "FROM unnest(${}::text[], ${}::timestamptz[]) AS u(id, at) WHERE k.id = u.id"
)
LAST_USED = _LAST_USED_FROM.format(1, 2)


_N = len(COLUMNS)
# A small batch (the writer at low load) goes in as one prepared statement: the same writes as
# COPY + INSERT_BATCH + LAST_USED, from arrays, in one round trip and one implicit transaction.
INSERT_ROWS = (
    "WITH batch AS (SELECT * FROM unnest("
    + ", ".join(f"${i}::{_ARRAYS.get(f, 'text[]')}" for i, (_, f) in enumerate(_CONVERT, 1))
    + f") AS b({', '.join(COLUMNS)})), "
    f"new AS (INSERT INTO usage_records ({', '.join(COLUMNS)}) SELECT "
    + ", ".join(
        "array_remove(string_to_array(tags, ','), '')" if c == "tags" else c for c in COLUMNS
    )
    + " FROM batch ORDER BY request_id ON CONFLICT DO NOTHING RETURNING *), "
    f"daily AS ({_ROLLUP}), used AS ({_LAST_USED_FROM.format(_N + 1, _N + 2)}) "
    "SELECT count(*) FROM new"
)


Entry = tuple[str, str, Fields]  # (stream, entry id, fields)


def decoded(entries: list[tuple[str, str, dict[str, str]]]) -> list[Entry]:
    """Entries as read -> their records by field name (``fields_of``, either form); an entry
    that is not a record is kept as it is, for :func:`record_row` to refuse (usage_rejects)."""
    out: list[Entry] = []
    for stream, entry_id, fields in entries:
        try:
            out.append((stream, entry_id, fields_of(fields)))
        except ValueError:
            out.append((stream, entry_id, fields))
    return out


def record_row(fields: Fields) -> tuple[Any, ...]:
    """A record (a stream entry's fields, as read or :func:`decoded`) -> the values of one
    usage_records row (a record from before routing names no served model: the requested one
    served it). ValueError for an entry that is not one."""
    if RECORD in fields:
        fields = fields_of(fields)  # as read, in the new form
    if not fields.get("served_model"):
        fields = {**fields, "served_model": fields.get("model", "")}
    return tuple(convert(fields.get(column, "")) for column, convert in _CONVERT)


def last_used(rows: list[tuple[Any, ...]]) -> tuple[list[str], list[datetime]]:
    """LAST_USED's parameters for rows: their keys, sorted, and each one's last use."""
    last: dict[str, datetime] = {}
    for row in rows:
        key_id, created = row[4], row[-1]
        if key_id not in last or last[key_id] < created:
            last[key_id] = created
    keys = sorted(last)
    return keys, [last[k] for k in keys]


_TAGS_AT = COLUMNS.index("tags")


def arrays(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """The rows as one array per column (INSERT_ROWS's parameters; tags comma-joined)."""
    columns = [list(column) for column in zip(*rows, strict=True)]
    columns[_TAGS_AT] = [",".join(tags) for tags in columns[_TAGS_AT]]
    return columns


def ack_args(entries: list[Entry]) -> dict[str, list[str | int]]:
    """``ack.lua``'s ARGV per stream for :func:`decoded` entries now in PostgreSQL: the group,
    the entry ids, and the request ids whose settle markers may now expire."""
    ids: dict[str, list[str]] = {}
    rids: dict[str, list[str]] = {}
    for stream, entry_id, fields in entries:
        ids.setdefault(stream, []).append(entry_id)
        if fields.get("request_id"):
            rids.setdefault(stream, []).append(str(fields["request_id"]))
    return {
        stream: [
            rk.USAGE_GROUP,
            " ".join(entry_ids),
            rk.AccountKeys(rk.account_of_stream(stream)).settled_marker_prefix,
            " ".join(rids.get(stream, ())),
            rk.RID_AFTER_LEDGER_S,
        ]
        for stream, entry_ids in ids.items()
    }

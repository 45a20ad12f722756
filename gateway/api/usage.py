"""Usage reports: ``GET /api/teams/{team}/usage`` and ``GET /api/me/usage``.

Query: ``from``, ``to`` (inclusive UTC days), ``group_by=member|key|model|day|tag`` (default
``model``), ``format=json|csv`` (default ``json``); the rules are in :mod:`policies.reports`.

Scope is the billing account, so a report always reconciles with the debits of that balance:

* a team's report covers every record billed to the team (``t_<team>``);
* ``/api/me/usage`` covers every record billed to the caller's personal balance (``u_<user>``):
  their personal keys, and their team keys in teams where their ``billing_mode`` is
  ``personal``. Team-billed use of their team keys is in that team's report (``group_by=member``).

JSON: ``{"data": [rows], "total": row, "from", "to", "group_by"}``. CSV is streamed from a
server-side cursor: header, rows, the total row last, as ``Content-Disposition: attachment``.

One statement computes the rows and the total (a materialized CTE grouped once), so both come
from one snapshot and the total counts a request with several tags once. It reads the daily
rollup ``usage_daily`` (``migrations/007_usage_daily.sql``), which the usage writer maintains in
the same transaction as the records, so a year of a busy team is a few thousand rows whatever the
size of ``usage_records``; timings: ``python -m bench.usage_bench``.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gateway import state as S
from gateway.api.common import current_user, json_response
from gateway.api.teams import team_access
from gateway.errors import InvalidRequest
from policies import keyspace as rk
from policies import reports
from policies.permissions import Action
from policies.reports import DayRange, Format, GroupBy, Row

log = logging.getLogger("modelbridge.usage")
routes = web.RouteTableDef()

CSV_BATCH = 500
#: the ``day`` grouping expression (the rollup is per UTC day already)
DAY_EXPR = "r.day"
_SUMS = (
    "sum(r.requests)::bigint AS requests, sum(r.prompt_tokens)::bigint AS prompt_tokens,"
    " sum(r.completion_tokens)::bigint AS completion_tokens, sum(r.list_cost)::bigint AS list_cost,"
    " sum(r.discount)::bigint AS discount, sum(r.charged)::bigint AS charged"
)
_RESUMS = (
    "coalesce(sum(g.requests), 0)::bigint, coalesce(sum(g.prompt_tokens), 0)::bigint,"
    " coalesce(sum(g.completion_tokens), 0)::bigint, coalesce(sum(g.list_cost), 0)::bigint,"
    " coalesce(sum(g.discount), 0)::bigint, coalesce(sum(g.charged), 0)::bigint"
)
_OUT = (
    "is_total, grp, label, requests, prompt_tokens, completion_tokens, list_cost, discount, charged"
)
_COLS = "g.requests, g.prompt_tokens, g.completion_tokens, g.list_cost, g.discount, g.charged"
_GROUP_EXPR = {
    GroupBy.MEMBER: "r.user_id",
    GroupBy.KEY: "r.key_id",
    GroupBy.MODEL: "r.model",
    GroupBy.DAY: DAY_EXPR,
    GroupBy.TAG: "r.tags",  # grouped by the whole tag set first, unnested afterwards
}
_ROWS = {
    GroupBy.MEMBER: (
        f"SELECT false, g.grp, u.email, {_COLS} FROM g LEFT JOIN users u ON u.id = g.grp"
    ),
    GroupBy.KEY: (
        f"SELECT false, g.grp, k.name || ' (' || k.prefix || ')', {_COLS}"
        " FROM g LEFT JOIN api_keys k ON k.id = g.grp"
    ),
    GroupBy.MODEL: f"SELECT false, g.grp, NULL, {_COLS} FROM g",
    GroupBy.DAY: f"SELECT false, to_char(g.grp::timestamp, 'YYYY-MM-DD'), NULL, {_COLS} FROM g",
    GroupBy.TAG: (
        f"SELECT false, t.tag, NULL, {_RESUMS}"
        " FROM g LEFT JOIN LATERAL unnest(g.grp) AS t (tag) ON true GROUP BY t.tag"
    ),
}


def build_query(group_by: GroupBy) -> str:
    """The SQL of one report. Parameters: ``$1`` account, ``$2`` start (inclusive), ``$3`` end
    (exclusive). Columns: is_total, grp, label, requests, prompt_tokens, completion_tokens,
    list_cost, discount, charged. Rows come ordered (``day`` by day, else by charged, highest
    first, a tag group ``NULL`` last), then the total row."""
    order = "grp" if group_by is GroupBy.DAY else 'grp IS NULL, charged DESC, grp COLLATE "C"'
    return (
        f"WITH g AS MATERIALIZED (SELECT {_GROUP_EXPR[group_by]} AS grp, {_SUMS}"
        " FROM usage_daily r WHERE r.account = $1"
        " AND r.day >= ($2::timestamptz AT TIME ZONE 'UTC')::date"
        " AND r.day < ($3::timestamptz AT TIME ZONE 'UTC')::date"
        " GROUP BY 1)"
        f" SELECT * FROM ({_ROWS[group_by]} UNION ALL SELECT true, 'total', NULL, {_RESUMS} FROM g)"
        f" AS q ({_OUT}) ORDER BY is_total, {order}"
    )


def to_row(record: Any) -> Row:
    return Row(*(record[i] for i in range(1, 9)))


def _single(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"'{name}' is given more than once", param=name)
    return values[0] if values else None


def _params(request: web.Request) -> tuple[DayRange, GroupBy, Format]:
    now = request.app[S.CLOCK].now()
    try:
        rng = reports.parse_range(_single(request, "from"), _single(request, "to"), now)
        group_by = reports.parse_group_by(_single(request, "group_by"))
        return rng, group_by, reports.parse_format(_single(request, "format"))
    except reports.ReportError as exc:
        raise InvalidRequest(exc.message, param=exc.param) from exc


async def _json(
    request: web.Request, account: str, rng: DayRange, group_by: GroupBy
) -> web.Response:
    records = await request.app[S.DB].fetch(build_query(group_by), account, rng.start, rng.end)
    rows = [to_row(r) for r in records]
    return json_response(
        {
            "data": [reports.row_json(row, group_by) for row in rows[:-1]],
            "total": reports.row_json(rows[-1], group_by),
            "from": rng.first.isoformat(),
            "to": rng.last.isoformat(),
            "group_by": group_by.value,
        }
    )


async def _csv(
    request: web.Request, account: str, subject: str, rng: DayRange, group_by: GroupBy
) -> web.StreamResponse:
    """Stream the report as CSV from a server-side cursor. The query runs (and may fail with a
    proper error response) before any byte is sent; a failure after that aborts the connection
    so that the client never takes a cut file for a whole one."""
    filename = reports.csv_filename(subject, rng, group_by)
    response = web.StreamResponse(
        headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )
    response.content_type = "text/csv"
    response.charset = "utf-8"
    async with request.app[S.DB].acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(build_query(group_by), account, rng.start, rng.end)
        batch = await cursor.fetch(CSV_BATCH)
        await response.prepare(request)
        try:
            await response.write(reports.csv_header(group_by).encode())
            while batch:
                chunk = "".join(reports.csv_row(to_row(r), group_by) for r in batch)
                await response.write(chunk.encode())
                batch = await cursor.fetch(CSV_BATCH) if len(batch) == CSV_BATCH else []
        except Exception as exc:
            if not isinstance(exc, ConnectionError):  # else the client went away: nothing to say
                log.exception("usage CSV for %s broke off mid-stream", subject)
            if request.transport is not None:
                request.transport.abort()  # the client sees a cut transfer, not a short file
            return response
    await response.write_eof()
    return response


async def _report(request: web.Request, account: str, subject: str) -> web.StreamResponse:
    rng, group_by, fmt = _params(request)
    if fmt is Format.CSV:
        return await _csv(request, account, subject, rng, group_by)
    return await _json(request, account, rng, group_by)


@routes.get("/api/teams/{team}/usage")
async def team_usage(request: web.Request) -> web.StreamResponse:
    access = await team_access(request, Action.VIEW_TEAM)
    return await _report(request, rk.team_account(access.team_id), access.team_id)


@routes.get("/api/me/usage")
async def my_usage(request: web.Request) -> web.StreamResponse:
    user = await current_user(request)
    return await _report(request, rk.user_account(user.id), "me")

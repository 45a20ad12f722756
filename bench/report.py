"""Summaries of a benchmark: medians over repetitions, paired gateway-minus-direct differences,
CPU per request, the checks, the ratios against the targets, and the markdown rendering."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

LITELLM_RPS = 77.0  # LiteLLM Proxy, 1 worker, c=32, same kind of machine (shared/bench/README.md)
LITELLM_CPU_MS = 13.1
LITELLM_ADDED_P50_MS = 18.3
GOALS = {  # name: (goal, "le" | "ge")
    "added_p50_ms": (1.0, "le"),
    "added_p99_ms": (5.0, "le"),
    "gateway_cpu_ms_per_req": (0.5, "le"),
    "throughput_rps": (20 * LITELLM_RPS, "ge"),
}

Run = dict[str, Any]
Extract = Callable[[Run], float | None]


def _get(run: Run, path: str) -> float | None:
    node: Any = run
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, int | float) else None


def med(xs: list[float | None]) -> dict[str, float] | None:
    vals = [x for x in xs if x is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(m: dict[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    if not m:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if m["n"] == 1 or m["min"] == m["max"]:
        return f.format(m["median"])
    return f"{f.format(m['median'])} [{f.format(m['min'])} – {f.format(m['max'])}]"


# (test, row label, path into a run, digits, paired difference?)
ROWS: list[tuple[str, str, str, int, bool]] = [
    ("latency", "achieved req/s", "load.rps", 1, False),
    ("latency", "p50 ms", "load.latency_ms.p50", 3, True),
    ("latency", "p90 ms", "load.latency_ms.p90", 3, True),
    ("latency", "p99 ms", "load.latency_ms.p99", 3, True),
    ("saturation", "req/s", "load.rps", 0, False),
    ("saturation", "p50 ms", "load.latency_ms.p50", 2, True),
    ("saturation", "p99 ms", "load.latency_ms.p99", 2, True),
    ("stream", "streams/s", "load.streams_per_s", 1, False),
    ("stream", "TTFB p50 ms", "load.ttfb_ms.p50", 3, True),
    ("stream", "TTFB p99 ms", "load.ttfb_ms.p99", 3, True),
    ("stream", "TTFT p50 ms", "load.ttft_ms.p50", 3, True),
    ("stream", "TTFT p99 ms", "load.ttft_ms.p99", 3, True),
    ("stream", "total p50 ms", "load.total_ms.p50", 3, True),
    ("stream", "total p99 ms", "load.total_ms.p99", 3, True),
]
CPU_GROUPS = ("gateway", "writer", "gateway_tree", "redis", "postgres", "fake")


def _runs(session: dict[str, Any], test: str, target: str) -> dict[int, Run]:
    return {r["rep"]: r for r in session["runs"] if r["test"] == test and r["target"] == target}


def paired(session: dict[str, Any], test: str, path: str, ratio: bool = False) -> Any:
    d, g = _runs(session, test, "direct"), _runs(session, test, session["label"])
    out: list[float | None] = []
    for rep in sorted(set(d) & set(g)):
        a, b = _get(d[rep], path), _get(g[rep], path)
        if a is not None and b is not None:
            out.append(b / a if ratio and a else b - a)
    return med(out)


def column(session: dict[str, Any], test: str, target: str, path: str) -> Any:
    return med([_get(r, path) for r in _runs(session, test, target).values()])


def summarize(session: dict[str, Any]) -> dict[str, Any]:
    label = session["label"]
    s: dict[str, Any] = {"figures": {}, "added": {}, "cpu": {}}
    for test, name, path, _, diff in ROWS:
        for target in ("direct", label):
            s["figures"].setdefault(test, {}).setdefault(name, {})[target] = column(
                session, test, target, path
            )
        if diff:
            s["added"].setdefault(test, {})[name] = paired(session, test, path)
    s["added"]["saturation"]["req/s ratio"] = paired(session, "saturation", "load.rps", True)
    for test in {r["test"] for r in session["runs"]}:
        row = {}
        for g in CPU_GROUPS:
            target = "direct" if g == "fake" else label
            row[g] = column(session, test, target, f"cpu.{g}_ms_per_req")
        row["fake_via_gateway"] = column(session, test, label, "cpu.fake_ms_per_req")
        row["gateway_plus_stores"] = med(
            [
                sum(
                    _get(r, f"cpu.{g}_ms_per_req") or 0
                    for g in ("gateway_tree", "redis", "postgres")
                )
                for r in _runs(session, test, label).values()
            ]
        )
        row["overhead_histogram_mean_ms"] = column(session, test, label, "server.overhead_mean_ms")
        row["foreign_cores_max"] = max(
            (r["cpu"]["foreign_cores"] for r in session["runs"] if r["test"] == test), default=None
        )
        s["cpu"][test] = row
    errors = {
        t: sum(
            r["load"]["errors"] + r.get("server", {}).get("non_200", 0)
            for r in session["runs"]
            if r["target"] == t
        )
        for t in ("direct", label)
    }
    s["errors"] = errors
    s["suspect_runs"] = sum(r["suspect"] for r in session["runs"])
    s["goals"] = goals(s)
    return s


def goals(s: dict[str, Any]) -> list[dict[str, Any]]:
    measured = {
        "added_p50_ms": (s["added"].get("latency", {}).get("p50 ms") or {}).get("median"),
        "added_p99_ms": (s["added"].get("latency", {}).get("p99 ms") or {}).get("median"),
        "gateway_cpu_ms_per_req": (s["cpu"].get("saturation", {}).get("gateway_tree") or {}).get(
            "median"
        ),
        "throughput_rps": max(
            (v or {}).get("median", 0)
            for k, v in s["figures"].get("saturation", {}).get("req/s", {}).items()
            if k != "direct"
        )
        if s["figures"].get("saturation")
        else None,
    }
    out = []
    for name, (goal, sense) in GOALS.items():
        value = measured[name]
        ratio = None if value is None else value / goal
        met = None if value is None else (value <= goal if sense == "le" else value >= goal)
        out.append(
            {
                "name": name,
                "goal": goal,
                "sense": sense,
                "measured": value,
                "ratio": ratio,
                "met": met,
            }
        )
    return out


_GOAL_TEXT = {
    "added_p50_ms": "added median latency, moderate load",
    "added_p99_ms": "added p99 latency, moderate load",
    "gateway_cpu_ms_per_req": "gateway CPU per request (saturation; serving + usage writer)",
    "throughput_rps": "throughput, 32 connections (20 × LiteLLM's 77 req/s)",
}
_TEST_TEXT = {
    "latency": "moderate load",
    "saturation": "saturation",
    "stream": "streaming",
}


def _figures_md(session: dict[str, Any], s: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    label = session["label"]
    desc = {
        "latency": f"moderate load: {plan['lat_conns']} conns, exp. think "
        f"{plan['lat_think_ms']:g} ms, {plan['lat_duration']:g} s",
        "saturation": f"saturation: {plan['sat_conns']} conns, no think time, "
        f"{plan['duration']:g} s",
        "stream": f"streaming: {plan['stream_conc']} streams, exp. think "
        f"{plan['stream_think_ms']:g} ms, {plan['duration']:g} s",
    }
    out = [
        f"| test | metric | direct | {label} | added by the gateway (paired) |",
        "|---|---|---|---|---|",
    ]
    for test, name, _, digits, diff in ROWS:
        if test not in s["figures"] or all(v is None for v in s["figures"][test][name].values()):
            continue
        cells = [fmt(s["figures"][test][name][t], digits) for t in ("direct", label)]
        added = fmt(s["added"][test][name], 3, signed=True) if diff else ""
        if test == "saturation" and name == "req/s":
            added = "× " + fmt(s["added"]["saturation"]["req/s ratio"], 3) + " of direct"
        out.append(f"| {desc[test]} | {name} | {cells[0]} | {cells[1]} | {added} |")
    return out


_CPU_COLUMNS = (  # (summary key, column title)
    ("gateway", "serving processes"),
    ("writer", "usage writer process"),
    ("gateway_tree", "gateway total (serving + writer)"),
    ("redis", "its Redis"),
    ("postgres", "its PostgreSQL"),
    ("gateway_plus_stores", "gateway + stores"),
    ("fake", "fake upstream, direct"),
    ("fake_via_gateway", "fake upstream, via gateway"),
    ("overhead_histogram_mean_ms", "gateway's overhead histogram, mean ms"),
)


def _cpu_md(s: dict[str, Any]) -> list[str]:
    out = ["| test | " + " | ".join(t for _, t in _CPU_COLUMNS) + " | foreign load, max cores |"]
    out.append("|---" * (len(_CPU_COLUMNS) + 2) + "|")
    for test in ("latency", "saturation", "stream"):
        row = s["cpu"].get(test)
        if row:
            cells = [fmt(row[k], 3) for k, _ in _CPU_COLUMNS] + [str(row["foreign_cores_max"])]
            out.append(f"| {_TEST_TEXT[test]} | " + " | ".join(cells) + " |")
    return out


def goals_md(sessions: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    labels = [sess["label"] for sess, _ in sessions]
    out = [
        "| goal | target | "
        + " | ".join(f"{lb}: measured (ratio to target)" for lb in labels)
        + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for i, (name, (goal, sense)) in enumerate(GOALS.items()):
        cells = []
        for _, s in sessions:
            g = s["goals"][i]
            if g["measured"] is None:
                cells.append("n/a")
                continue
            mark = "met" if g["met"] else "NOT met"
            extra = (
                f", {g['measured'] / LITELLM_RPS:.1f}× LiteLLM" if name == "throughput_rps" else ""
            )
            cells.append(f"{g['measured']:.3f} ({g['ratio']:.2f}× the target{extra}) {mark}")
        op = "≤" if sense == "le" else "≥"
        unit = " req/s" if name == "throughput_rps" else " ms"
        out.append(f"| {_GOAL_TEXT[name]} | {op} {goal:g}{unit} | " + " | ".join(cells) + " |")
    return out


def _verify_md(session: dict[str, Any], s: dict[str, Any]) -> list[str]:
    v = session["verify"]
    return [
        f"- errors (transport + non-200): direct {s['errors']['direct']}, "
        f"{session['label']} {s['errors'][session['label']]}; gateway responses by status: "
        f"{v['gateway_responses_by_status']}",
        f"- usage records in PostgreSQL: {v['usage_records']} "
        f"({v['usage_records_by_source_status']}); the gateway served "
        f"{v['gateway_responses_by_status'].get('200', 0)} × 200 "
        f"(equal: {v['records_equal_served']}); responses counted by the clients "
        f"{v['client_ok_responses']} (records − client count = {v['records_minus_client_ok']}, "
        f"in-flight margin {v['in_flight_margin']})",
        f"- `modelbridge_usage_events_pending`: max seen after a run {v['pending_max_seen']}, "
        f"at the end {v['pending_at_end']} (final drain {v['final_drain_s']} s; PostgreSQL "
        f"matched the served count {v.get('records_waited_s', 0)} s later)",
        f"- runs kept as suspect (foreign load): {s['suspect_runs']}; "
        f"pairs measured again: {len(session['discarded_runs']) // 2}",
        f"- all checks passed: **{v['ok']}**",
    ]


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    plan = meta["plan"]
    lines = [
        f"# ModelBridge benchmark, {meta['started']}",
        "",
        f"Machine: {meta['host']['cpus']} CPUs, load average before {meta['loadavg_before']}, "
        f"Python {meta['host']['python']}, {meta['wrk']}. Fake upstream: `tests.fake_upstream` "
        f"(one process). Every request is fully metered (key, hold, settle, usage stream, usage "
        f"writer). Each cell: median [min – max] over {plan['repeats']} repetition(s); "
        "*added* = gateway − direct within the same repetition. Times in ms.",
    ]
    pairs = [(sess, summarize(sess)) for sess in result["sessions"]]
    for sess, s in pairs:
        lines += ["", f"## {sess['label']} ({sess['workers']} worker(s))", ""]
        lines += _figures_md(sess, s, plan)
        lines += [
            "",
            "CPU time per request, ms (utime + stime from /proc; the gateway's and its "
            "stores' counted until the usage writer has drained):",
            "",
        ]
        lines += _cpu_md(s)
        lines += ["", "Checks:", "", *_verify_md(sess, s)]
    lines += ["", "## Against the targets", "", *goals_md(pairs)]
    lines += [
        "",
        f"LiteLLM Proxy (1 worker) on this kind of machine: {LITELLM_RPS:g} req/s, "
        f"{LITELLM_CPU_MS} ms CPU/request, +{LITELLM_ADDED_P50_MS} ms median.",
    ]
    return "\n".join(lines) + "\n"

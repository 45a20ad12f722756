"""A/B: two checkouts' gateways measured interleaved, to tell a hot-path change's effect from
the drift of a shared machine.

    python -m bench.ab --a DIR --b DIR [--test saturation|latency|stream] [--rounds 6]
                       [--duration 8] [--b-key-limits]

DIR is a checkout (or a copy of its ``gateway/``, ``policies/`` and ``tests/``); both run on this
venv, each with its own embedded stores, against one fake upstream. Runs go A B B A A B ... (the
ABBA order cancels a linear drift); each is a ``bench.run`` measurement (the quiet-machine gate,
CPU counted until the usage writer has drained). Prints per round the gateway processes' CPU ms
per request, req/s and p50, and the median [min – max] of the paired B/A ratios and of the
paired B − A differences. ``--b-key-limits`` gives B's bench key ``rpm`` and ``tpm`` (never
reached): with ``--a`` and ``--b`` the same checkout, what rate limits add to the hot path.

``--together``: each round loads A and B at the same time (one wrk each, in two threads), so both
meet the same foreign load; on a shared machine whose load moves within seconds this resolves a
few per cent where the ABBA order does not (the two gateways share the cores: the absolute
figures are not a lone gateway's, the ratios are the point; an A/A run on 2026-11-28 gave
1.004 [0.945-1.037] over 8 rounds of saturation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench import load, report
from bench.run import log, stop_cleanly
from bench.session import Plan, Session
from bench.stack import FakeUpstream, Gateway


def _plan(a: argparse.Namespace) -> Plan:
    return Plan(
        repeats=1,
        duration=a.duration,
        lat_duration=a.duration,
        lat_conns=4,
        lat_think_ms=a.think_ms,
        sat_conns=32,
        stream_conc=4,
        stream_think_ms=50.0,
        warmup=3,
        tests=(a.test,),
        max_foreign=a.max_foreign,
        quiet_wait=60,
        retries=0,
    )


def _figures(run: dict[str, Any]) -> dict[str, float]:
    cpu, result = run["cpu"], run["load"]
    figures = {
        "gateway_ms": cpu["gateway_ms_per_req"],  # per stream in the stream test
        "stores_ms": cpu.get("redis_ms_per_req", 0) + cpu.get("postgres_ms_per_req", 0),
    }
    if "ttfb_ms" in result:  # the stream test: streams/s and the p50 of TTFB, TTFT, total
        figures["rps"] = result["streams_per_s"]
        figures |= {f"{k}_p50_ms": result[f"{k}_ms"]["p50"] for k in ("ttfb", "ttft", "total")}
    else:
        figures |= {"rps": result["rps"], "p50_ms": result["latency_ms"]["p50"]}
    return figures | {"foreign": cpu["foreign_cores"]}


def compare(sessions: dict[str, Session], a: argparse.Namespace) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"A": [], "B": []}
    for name, s in sessions.items():
        s.sanity()
        s.warm_up()
        log(f"{name}: warmed up")
    for i in range(a.rounds):
        if a.together:
            _together(sessions, a, rows, i)
            continue
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            s = sessions[name]
            s.quiet_gate()
            fig = _figures(s.measure(s.target, a.test))
            rows[name].append(fig)
            log(f"round {i + 1} {name}: " + " ".join(f"{k} {v:.3f}" for k, v in fig.items()))
    return rows


def _together(
    sessions: dict[str, Session], a: argparse.Namespace, rows: dict[str, list[dict]], i: int
) -> None:
    figures: dict[str, dict[str, float]] = {}

    def measure(name: str) -> None:
        s = sessions[name]
        figures[name] = _figures(s.measure(s.target, a.test))

    threads = [threading.Thread(target=measure, args=(name,)) for name in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in ("A", "B"):
        rows[name].append(figures[name])
        line = " ".join(f"{k} {v:.3f}" for k, v in figures[name].items())
        log(f"round {i + 1} {name} (together): {line}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="the base checkout")
    p.add_argument("--b", type=Path, required=True, help="the changed checkout")
    p.add_argument("--test", choices=("saturation", "latency", "stream"), default="saturation")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument(
        "--think-ms",
        type=float,
        default=50.0,
        help="latency test: mean think time (200 ≈ 20 req/s)",
    )
    p.add_argument("--max-foreign", type=float, default=0.15)
    p.add_argument("--together", action="store_true", help="load A and B at the same time")
    p.add_argument(
        "--b-key-limits", action="store_true", help="B's key has rpm and tpm set (never reached)"
    )
    a = p.parse_args()
    stop_cleanly()
    load.ensure_wrk()
    plan = _plan(a)
    with tempfile.TemporaryDirectory(prefix="mb-ab-") as tmp:
        body = load.write_body(Path(tmp))
        fake = FakeUpstream(Path(tmp))
        fake.start()
        limits = {"rpm": 10**9, "tpm": 10**15} if a.b_key_limits else None
        gateways = {"A": Gateway(1, fake.url, a.a), "B": Gateway(1, fake.url, a.b, None, limits)}
        try:
            for gw in gateways.values():
                gw.start()
                gw.provision()
            sessions = {n: Session(plan, fake, gw, body, log=log) for n, gw in gateways.items()}
            for name, s in sessions.items():  # the other gateway's CPU is not foreign load
                other = gateways["B" if name == "A" else "A"]
                s.groups.roots |= {f"other_{k}": v for k, v in other.groups().roots.items()}
            rows = compare(sessions, a)
        finally:
            for gw in gateways.values():
                gw.stop()
            fake.stop()
    limited = " (B's key with rpm and tpm)" if a.b_key_limits else ""
    print(f"\n{a.test}, {a.rounds} rounds of {a.duration} s; A = {a.a}, B = {a.b}{limited}\n")
    print("| figure | A | B | B / A (paired) | B − A (paired) |\n|---|---|---|---|---|")
    for key in [k for k in rows["A"][0] if k != "foreign"]:
        va, vb = [r[key] for r in rows["A"]], [r[key] for r in rows["B"]]
        ratio = report.med([y / x for x, y in zip(va, vb, strict=True) if x])
        diff = report.med([y - x for x, y in zip(va, vb, strict=True)])
        print(
            f"| {key} | {report.fmt(report.med(va))} | {report.fmt(report.med(vb))} "
            f"| {report.fmt(ratio)} | {report.fmt(diff, signed=True)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

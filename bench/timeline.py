"""Where a low-load request's wall time goes, read from the kernel's scheduler:
``python -m bench.timeline [--requests N] [--think-ms MS] [--keys plain,limited,direct]``.

One gateway (1 worker, embedded stores, full metering) and the fake upstream, as ``bench.run``
starts them; requests are sent one at a time on a raw keep-alive socket per key
(``bench.keylimits``' client; several keys take turns in a shuffled order, so their figures are
paired) with an exponential think time between them, while ``perf sched record``
(CLOCK_MONOTONIC stamps, every CPU) records every context switch and wake-up. For each
request's window — from the client's ``sendall`` to the last byte of the answer — the
scheduler's record says how long each process ran inside it (on either core), how long the
cores were idle, and how long each woken process waited for a core. Reported per key: the
medians over the requests, per role (client, gateway, Redis, fake upstream, usage writer,
PostgreSQL, other).

It answers what a profile of one process cannot: whether the added milliseconds are the
gateway's and Redis's work done in series (the sum of their run times within the window), or
waits (wake-up delays, idle cores while something sleeps). ``perf`` must be installed and
allowed to trace the scheduler (root). A request's window also holds work that is not on its
path (the settle that Redis runs while the answer travels, the usage writer's batch): a process's
run time in the window is an upper bound of what it adds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.keylimits import LIMITS, RawConnection
from bench.stack import serving

_LINE = re.compile(
    r"^\s*(?P<t>\d+\.\d+)\s+\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<idle><idle>)|(?P<comm>.+?)\[(?P<tid>\d+)(?:/(?P<pid>\d+))?\])\s+(?P<rest>.*)$"
)
ROLES = ("client", "gateway", "redis", "fake", "writer", "postgres", "other", "idle")


@dataclass(frozen=True)
class Run:
    """A stretch a task ran on a core, ending at ``end`` (monotonic seconds)."""

    end: float
    ran_s: float
    delay_s: float  # from its wake-up to this run's start (0 when it was not woken)
    role: str


def parse(text: str, pids: dict[int, str]) -> list[Run]:
    """``perf sched timehist`` output -> the runs, each with its process's role."""
    runs = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or "awakened:" in m["rest"]:
            continue
        fields = m["rest"].split()
        if len(fields) < 3:
            continue
        try:
            wait_ms, delay_ms, run_ms = (float(f) for f in fields[-3:])
        except ValueError:
            continue
        pid = int(m["pid"] or m["tid"] or 0)
        comm = (m["comm"] or "").strip()
        if m["idle"]:
            role = "idle"
        elif pid in pids:
            role = pids[pid]
        elif comm.startswith("redis-server") or comm.startswith("bio_"):
            role = "redis"
        elif comm.startswith("postgres"):
            role = "postgres"
        else:
            role = "other"
        runs.append(Run(float(m["t"]), run_ms / 1000, delay_ms / 1000 if wait_ms else 0.0, role))
    runs.sort(key=lambda r: r.end)
    return runs


def in_windows(
    runs: list[Run], windows: list[tuple[float, float]]
) -> list[dict[str, tuple[float, float]]]:
    """Per window: {role: (seconds it ran inside the window, seconds its runs waited for a core)}."""
    ends = [r.end for r in runs]
    longest = min(5.0, max((r.ran_s for r in runs), default=0.0))
    out = []
    for start, stop in windows:
        seen: dict[str, tuple[float, float]] = {}
        # a run ending after the window may have started inside it: look past its end
        for run in runs[bisect_left(ends, start) : bisect_right(ends, stop + longest)]:
            began = run.end - run.ran_s
            overlap = min(run.end, stop) - max(began, start)
            if overlap <= 0:
                continue
            ran, waited = seen.get(run.role, (0.0, 0.0))
            seen[run.role] = (ran + overlap, waited + (run.delay_s if began >= start else 0.0))
        out.append(seen)
    return out


def record(requests: int, think_ms: float, keys: list[str], workdir: Path) -> tuple[str, dict]:
    data = workdir / "perf.data"
    with serving(workdir, limited=LIMITS) as (fake, gw):
        secrets = {"plain": gw.key, "limited": gw.limited_key, "direct": ""}
        body = json.dumps(load.CHAT_BODY).encode()
        conns = {
            key: RawConnection(fake.port if key == "direct" else gw.port, secrets[key], body)
            for key in keys
        }
        for _ in range(200):  # warm-up
            for conn in conns.values():
                conn.one()
        pids = {fake.proc.pid: "fake", gw.pid: "gateway"} if fake.proc else {gw.pid: "gateway"}
        writer = gw.writer_pid()
        if writer:
            pids[writer] = "writer"
        perf = subprocess.Popen(
            ["perf", "sched", "record", "-k", "CLOCK_MONOTONIC", "-a", "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rng = random.Random(1)
        windows: dict[str, list[tuple[float, float]]] = {key: [] for key in keys}
        took: dict[str, list[float]] = {key: [] for key in keys}
        order = list(keys)
        try:
            time.sleep(1.5)  # perf is tracing
            for _ in range(requests):
                rng.shuffle(order)  # the keys take turns in a shuffled order: paired figures
                for key in order:
                    started = time.monotonic()
                    ms, status = conns[key].one()
                    windows[key].append((started, time.monotonic()))
                    took[key].append(ms)
                    if b" 200 " not in status:
                        raise RuntimeError(f"HTTP {status!r}")
                    time.sleep(rng.expovariate(1000 / think_ms))
        finally:
            perf.send_signal(signal.SIGINT)  # perf writes its record and ends
            perf.wait(60)
    text = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True, check=True
    ).stdout
    pids[os.getpid()] = "client"
    return text, {"windows": windows, "took_ms": took, "pids": pids}


def summary(text: str, meta: dict) -> str:
    runs = parse(text, {int(k): v for k, v in meta["pids"].items()})
    lines = []
    for key, windows in meta["windows"].items():
        per = in_windows(runs, windows)
        p50 = statistics.median(meta["took_ms"][key])
        lines += [
            f"{key}: {len(per)} requests, p50 {p50:.3f} ms (client's clock)",
            "",
            "| role | median ran in window, ms | mean ran, ms | mean waited for a core, ms |",
            "|---|---|---|---|",
        ]
        for role in ROLES:
            ran = [w.get(role, (0.0, 0.0))[0] * 1000 for w in per]
            waited = [w.get(role, (0.0, 0.0))[1] * 1000 for w in per]
            lines.append(
                f"| {role} | {statistics.median(ran):.3f} | {statistics.mean(ran):.3f} |"
                f" {statistics.mean(waited):.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--think-ms", type=float, default=12.0)
    p.add_argument(
        "--keys",
        default="plain",
        help="comma-separated, taking turns: plain, limited (rpm and tpm set), direct (the fake)",
    )
    a = p.parse_args(argv)
    keys = a.keys.split(",")
    if not keys or set(keys) - {"plain", "limited", "direct"}:
        p.error("--keys: plain, limited or direct")
    with tempfile.TemporaryDirectory(prefix="mb-timeline-") as tmp:
        text, meta = record(a.requests, a.think_ms, keys, Path(tmp))
    print(summary(text, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

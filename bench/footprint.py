"""Memory and wake-ups of a process tree, per process: ``python -m bench.footprint PID...``.

Memory is read from ``/proc/<pid>/smaps_rollup`` (PSS: a page shared by n processes counts 1/n
in each, so the sum over a tree counts every page once; RSS would count a shared page n times),
as the shared harness sums it. Wake-ups are the context switches of every thread of a process
(``/proc/<pid>/task/*/status``: voluntary, when it waited for something; involuntary, when it
was preempted) over a window: at low load nearly every voluntary switch is one wake-up.

``--seconds N`` samples the switches over N seconds (0: memory only); ``--json`` prints the
rows as JSON. The roots' whole trees are listed (``bench.procs.tree``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

from bench.procs import all_procs, tree


@dataclass(frozen=True)
class Footprint:
    pid: int
    name: str  # what the process is, from its command line
    pss_kib: int
    rss_kib: int
    private_kib: int  # Private_Clean + Private_Dirty: what its end would free
    wakeups_per_s: float = 0.0  # voluntary context switches per second, over all its threads
    preempted_per_s: float = 0.0  # involuntary ones


def _rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0])
    except OSError:
        pass
    return out


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the threads of ``pid``."""
    vol = invol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
        except OSError:
            continue
    return vol, invol


def describe(pid: int) -> str:
    """A short name: ``postgres: checkpointer``, ``redis-server``, ``modelbridge _writer``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("postgres"):
        return argv[0] if ":" in argv[0] else "postgres (postmaster)"
    base = os.path.basename(argv[0])
    if "redis-server" in argv[0]:
        return "redis-server"
    for arg, label in (("_writer", "usage writer"), ("_worker", "worker"), ("serve", "serve")):
        if arg in argv:
            if arg == "_worker" and _standby(pid):
                return "spare worker"
            return label
    return base


def _standby(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"MODELBRIDGE_STANDBY=1" in f.read().split(b"\0")
    except OSError:
        return False


def measure(roots: list[int], seconds: float = 0.0) -> list[Footprint]:
    pids = sorted(tree(roots, all_procs()))
    before = {pid: switches(pid) for pid in pids}
    if seconds > 0:
        time.sleep(seconds)
    rows = []
    for pid in pids:
        roll = _rollup(pid)
        vol, invol = switches(pid)
        span = seconds if seconds > 0 else 1.0
        rows.append(
            Footprint(
                pid,
                describe(pid),
                roll.get("Pss", 0),
                roll.get("Rss", 0),
                roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0),
                round((vol - before[pid][0]) / span, 1) if seconds > 0 else 0.0,
                round((invol - before[pid][1]) / span, 1) if seconds > 0 else 0.0,
            )
        )
    return rows


def table(rows: list[Footprint]) -> str:
    lines = ["| process | PSS MiB | RSS MiB | private MiB | wake-ups/s | preempted/s |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| {r.name} ({r.pid}) | {r.pss_kib / 1024:.1f} | {r.rss_kib / 1024:.1f} |"
            f" {r.private_kib / 1024:.1f} | {r.wakeups_per_s} | {r.preempted_per_s} |"
        )
    pss = sum(r.pss_kib for r in rows) / 1024
    wake = sum(r.wakeups_per_s for r in rows)
    lines.append(f"| **total, {len(rows)} processes** | **{pss:.1f}** | | | {wake:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("pids", type=int, nargs="+", help="root pids (their trees are counted)")
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(args.pids, args.seconds)
    print(json.dumps([asdict(r) for r in rows]) if args.json else table(rows))


if __name__ == "__main__":
    main()

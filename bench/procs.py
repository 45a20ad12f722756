"""CPU accounting from /proc: per-process ticks, process trees, machine-wide busy time.

Everything is sampled as snapshots (``Snapshot.take()``) before and after a measured run; the
difference attributes CPU time to the gateway, its stores, the fake upstream, the load generator
(rusage of this driver's waited-for children) and everything else ("foreign" load: another
engineer's test suite on the same 2-core machine).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
KTHREADD = 2


@dataclass(frozen=True)
class ProcInfo:
    name: str
    ppid: int
    ticks: int  # utime + stime


def _read_stat(pid: str) -> tuple[tuple[int, str], ProcInfo] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    name = s[s.index("(") + 1 : s.rindex(")")]
    fields = s[s.rindex(")") + 2 :].split()
    # fields[0] is state; ppid is fields[1]; utime/stime 11/12; starttime 19
    info = ProcInfo(name, int(fields[1]), int(fields[11]) + int(fields[12]))
    return (int(pid), fields[19]), info


def all_procs() -> dict[tuple[int, str], ProcInfo]:
    """{(pid, starttime): ProcInfo} for every process on the machine."""
    out: dict[tuple[int, str], ProcInfo] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            got = _read_stat(d)
            if got is not None:
                out[got[0]] = got[1]
    return out


def tree(roots: Iterable[int], procs: dict[tuple[int, str], ProcInfo]) -> set[int]:
    """The given pids and all their descendants (among ``procs``)."""
    kids: dict[int, list[int]] = {}
    for (pid, _), info in procs.items():
        kids.setdefault(info.ppid, []).append(pid)
    alive = {pid for pid, _ in procs}
    out: set[int] = set()
    todo = [p for p in roots if p in alive]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(kids.get(pid, ()))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def machine_ticks() -> tuple[int, int]:
    """(total, idle+iowait) jiffies from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]), v[3] + v[4]


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Snapshot:
    wall: float
    machine: tuple[int, int]
    procs: dict[tuple[int, str], ProcInfo]
    children_s: float

    @classmethod
    def take(cls) -> Snapshot:
        return cls(time.monotonic(), machine_ticks(), all_procs(), children_cpu_s())


@dataclass
class Groups:
    """Named groups of root pids whose whole process trees are accounted (minus later groups'
    trees: a gateway's embedded Redis is its child but is listed on its own)."""

    roots: dict[str, list[int]] = field(default_factory=dict)

    def resolve(self, procs: dict[tuple[int, str], ProcInfo]) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for name, pids in self.roots.items():
            out[name] = tree(pids, procs)
        for name in out:
            for other, theirs in out.items():
                if other != name and set(self.roots[other]) & out[name]:
                    out[name] -= theirs
        return out


def _kernel_threads(procs: dict[tuple[int, str], ProcInfo]) -> set[int]:
    return {pid for (pid, _), info in procs.items() if pid == KTHREADD or info.ppid == KTHREADD}


def usage(a: Snapshot, b: Snapshot, groups: Groups, own_pids: Iterable[int] = ()) -> dict:
    """CPU between two snapshots: seconds per group, load generator, foreign user processes (in
    cores), the machine's busy cores, and the busiest foreign processes."""
    secs = max(b.wall - a.wall, 1e-9)
    both = {**a.procs, **b.procs}
    members = groups.resolve(both)
    delta = {
        k: info.ticks - a.procs.get(k, ProcInfo(info.name, 0, 0)).ticks
        for k, info in b.procs.items()
    }
    out: dict = {"seconds": round(secs, 3)}
    ours: set[int] = set(own_pids) | {os.getpid()}
    for name, pids in members.items():
        ours |= pids
        out[f"{name}_cpu_s"] = round(sum(d for k, d in delta.items() if k[0] in pids) / CLK_TCK, 3)
    kthreads = _kernel_threads(both)
    foreign = sorted(
        (
            (d, k[0], b.procs[k].name)
            for k, d in delta.items()
            if d > 0 and k[0] not in ours and k[0] not in kthreads
        ),
        reverse=True,
    )
    total, idle = b.machine[0] - a.machine[0], b.machine[1] - a.machine[1]
    ncpu = os.cpu_count() or 1
    out["machine_busy_cores"] = round((total - idle) / total * ncpu, 3) if total else None
    out["loadgen_cores"] = round((b.children_s - a.children_s) / secs, 3)
    out["kernel_threads_cores"] = round(
        sum(d for k, d in delta.items() if k[0] in kthreads) / CLK_TCK / secs, 3
    )
    out["foreign_cores"] = round(sum(d for d, _, _ in foreign) / CLK_TCK / secs, 3)
    out["foreign_top"] = [
        {"pid": pid, "name": name, "cores": round(d / CLK_TCK / secs, 3)}
        for d, pid, name in foreign[:4]
    ]
    return out


def foreign_now(groups: Groups, window: float = 0.5) -> tuple[float, list[dict]]:
    """Cores used by foreign user processes over a short window, and the busiest of them."""
    a = Snapshot.take()
    time.sleep(window)
    u = usage(a, Snapshot.take(), groups)
    return u["foreign_cores"], u["foreign_top"]


def loadavg() -> list[float]:
    return list(os.getloadavg())

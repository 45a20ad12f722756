"""Where Redis's CPU goes per request, at saturation: ``python -m bench.redis_cost``.

    python -m bench.redis_cost [--seconds 15] [--conns 32] [--strace 5] [--project DIR]

Starts the fake upstream and a gateway (1 worker, embedded stores, a funded team key: the full
metering path) as ``bench.run`` does, warms it up, drives it with wrk (closed loop), waits until
the usage writer has moved every record, and prints per request served:

* each command Redis ran (``INFO commandstats``; the commands a script runs are counted both on
  their own and inside the ``evalsha`` that ran them): calls, and microseconds inside Redis (wall
  time: a preempted server inflates it, so compare shares within one run);
* what went into the append-only file (the commands a script's effects are propagated as, and
  the writer's ``XCLAIM`` for every entry ``XREADGROUP`` delivers): commands and bytes;
* ``INFO stats``: commands processed, reads and writes (one read may carry many commands),
  network bytes; and the server's CPU (utime + stime from /proc), with the writer's and the
  serving process's for scale;
* with ``--strace S``: the system calls Redis made over S seconds of the load, per request.

Counts are what compare across runs on a noisy machine; times only within one sitting.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench import load
from bench.stack import serving

CLK_TCK = 100  # /proc ticks per second (bench.procs reads sysconf; the figure only scales)


@dataclass
class Snap:
    commands: dict[str, tuple[int, int]]  # name -> (calls, usec)
    stats: dict[str, Any]
    ticks: dict[str, int]  # process group -> utime + stime


def _ticks(pid: int) -> int:
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])
    return 0


def snap(client: redis.Redis, pids: dict[str, int]) -> Snap:
    commands = {}
    for name, value in client.info("commandstats").items():
        commands[name.removeprefix("cmdstat_")] = (int(value["calls"]), int(value["usec"]))
    return Snap(commands, client.info("stats"), {k: _ticks(p) for k, p in pids.items()})


def aof_commands(data: bytes) -> Iterator[tuple[str, int]]:
    """(command name, bytes) of each command in a stretch of an append-only file."""
    at = 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        argc, begin, at = int(data[at + 1 : end]), at, end + 2
        name = b""
        for i in range(argc):
            end = data.index(b"\r\n", at)
            size = int(data[at + 1 : end])
            if i == 0:
                name = data[end + 2 : end + 2 + size]
            at = end + 2 + size + 2
        yield name.decode().upper(), at - begin


def aof_file(data_dir: Path) -> Path:
    return sorted((data_dir / "redis" / "appendonlydir").glob("*.incr.aof"))[-1]


def wait_drained(client: redis.Redis, streams: list[str], timeout: float = 60) -> None:
    """Until the usage streams are empty (the writer moved and deleted every record)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(int(client.xlen(s)) for s in streams) == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("the usage writer did not drain the streams")


def report(before: Snap, after: Snap, served: int, aof: bytes, seconds: float) -> str:
    n = max(served, 1)
    out = [f"{served} requests in {seconds:.1f} s ({served / seconds:.0f}/s)", ""]
    out.append(f"{'command':26s} {'calls/req':>10s} {'us/req':>8s}")
    rows: list[tuple[str, float, float]] = []
    for name, (calls, usec) in after.commands.items():
        c0, u0 = before.commands.get(name, (0, 0))
        if calls > c0:
            rows.append((name, (calls - c0) / n, (usec - u0) / n))
    for name, per_req, us in sorted(rows, key=lambda r: -r[2]):
        out.append(f"{name:26s} {per_req:10.3f} {us:8.2f}")
    out += ["", f"{'append-only file':26s} {'cmds/req':>10s} {'B/req':>8s}"]
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for name, size in aof_commands(aof):
        counts[name] += 1
        sizes[name] += size
    for name, count in counts.most_common():
        out.append(f"{name:26s} {count / n:10.3f} {sizes[name] / n:8.1f}")
    total = sum(counts.values()) / n, sum(sizes.values()) / n
    out.append(f"{'total':26s} {total[0]:10.3f} {total[1]:8.1f}")
    out += ["", "INFO stats per request:"]
    for key in (
        "total_commands_processed",
        "total_reads_processed",
        "total_writes_processed",
        "total_net_input_bytes",
        "total_net_output_bytes",
        "keyspace_hits",
        "keyspace_misses",
    ):
        out.append(f"  {key:28s} {(int(after.stats[key]) - int(before.stats[key])) / n:10.3f}")
    out += ["", "CPU per request (/proc utime + stime):"]
    for name, ticks in after.ticks.items():
        ms = (ticks - before.ticks[name]) * 1000 / CLK_TCK / n
        out.append(f"  {name:10s} {ms:.4f} ms")
    return "\n".join(out)


def strace(pid: int, seconds: float, out: Path) -> None:
    """``strace -c -f`` on Redis for ``seconds`` (its summary goes to ``out``)."""
    proc = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(seconds)
    proc.send_signal(2)
    proc.wait(timeout=30)


def syscalls_per_request(summary: str, served: int) -> str:
    out = [f"{'syscall':16s} {'calls/req':>10s}"]
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            out.append(f"{parts[-1]:16s} {int(parts[3]) / max(served, 1):10.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--strace", type=float, default=0, help="seconds of strace -c on Redis")
    p.add_argument("--project", type=Path, default=None, help="measure another checkout")
    a = p.parse_args(argv)
    load.ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="mb-redis-cost-") as tmp:
        body = load.write_body(Path(tmp))
        with serving(Path(tmp), a.project) as (_, gw):
            sock = str(gw.data_dir / "redis" / "redis.sock")
            client = redis.Redis(unix_socket_path=sock, decode_responses=True)
            pids = {"redis": gw.store_pids()["redis"], "gateway": gw.pid}
            writer = gw.writer_pid()
            if writer is not None:
                pids["writer"] = writer
            target = load.Target(gw.label, gw.base + "/v1/chat/completions", gw.key)
            load.wrk(target, body, a.conns, 3)  # warm-up
            streams = [str(s) for s in client.scan_iter(match="*:usage", _type="stream")]
            wait_drained(client, streams)
            # no rewrite during the run: it starts a new incr file, and the run's commands would
            # be read from the old one's tail (found empty: 0 commands a request)
            client.config_set("auto-aof-rewrite-percentage", 0)
            deadline = time.monotonic() + 60
            while client.info("persistence")["aof_rewrite_in_progress"]:  # one the warm-up began
                if time.monotonic() > deadline:
                    raise RuntimeError("an append-only file rewrite did not end")
                time.sleep(0.05)
            aof = aof_file(gw.data_dir)
            offset = aof.stat().st_size
            before = snap(client, pids)
            result: dict[str, Any] = {}
            driver = threading.Thread(
                target=lambda: result.update(load.wrk(target, body, a.conns, a.seconds))
            )
            began = time.monotonic()
            driver.start()
            traced = ""
            if a.strace:
                time.sleep(2)
                served0 = snap(client, {}).commands.get("xadd", (0, 0))[0]
                strace(pids["redis"], a.strace, Path(tmp) / "strace.txt")
                served1 = snap(client, {}).commands.get("xadd", (0, 0))[0]
                summary = (Path(tmp) / "strace.txt").read_text()
                traced = "\n\nsystem calls of Redis under strace (one settle's XADD per request):\n"
                traced += syscalls_per_request(summary, served1 - served0)
            driver.join()
            took = time.monotonic() - began
            wait_drained(client, streams)
            after = snap(client, pids)
            appended = b""
            if aof_file(gw.data_dir) != aof:
                raise RuntimeError("the append-only file was rewritten during the run")
            with aof.open("rb") as f:
                f.seek(offset)
                appended = f.read()
            served = int(result["requests_ok"])
            if result["errors"]:
                print(f"wrk: {result['errors']} errors {result['error_detail']}")
            print(report(before, after, served, appended, took) + traced)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The usage writer's cadence: how often its process wakes, and how soon a record lands.

    python -m bench.cadence [--seconds 10] [--rates 0,20,80] [--probes 20]
                            [--projects this=.,main=/work/main] [--redis single|cluster]

Starts the fake upstream and ``modelbridge serve`` (one worker, its usage writer a process of
its own), then for each load (requests/s; 0 = idle) counts over ``--seconds``: the writer
process's context switches (``voluntary_ctxt_switches`` of its threads in /proc: each one a
wait it woke from) and CPU time, and PostgreSQL's CPU time (all its processes). Under the same
load it sends ``--probes`` requests of its own one at a time, at random moments, and times
each until its record is in ``usage_records`` (polled every 5 ms): how soon a record lands.
``--projects``: one gateway per checkout (its gateway/ and policies/ run on this venv), all
started at once and measured in turn at each load (an A/B in one run). ``--redis cluster``: each
gateway on a Redis Cluster of its own (3 masters + 3 replicas on loopback, ``bench.cluster``).

The load is paced requests (one connection per 20 requests/s, each sending every 50 ms).
Counts, not latencies, are the figures to compare across runs on a noisy machine; the landing
times compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import cluster, procs
from bench.load import CHAT_BODY
from bench.stack import FakeUpstream, Gateway, RedisSetup


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid``."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return vol, invol


def _cpu_s(pids: set[int]) -> float:
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / 100.0


async def _pace(
    session: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event, sent: list[int]
) -> None:
    """One request every 50 ms (as long as each takes less) until ``stop``; counted in sent[0]."""
    headers = {"Authorization": f"Bearer {key}"}
    next_at = time.monotonic()
    while not stop.is_set():
        async with session.post(url, json=CHAT_BODY, headers=headers) as resp:
            await resp.read()
        sent[0] += 1
        next_at += 0.05
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))


async def _probe(session: aiohttp.ClientSession, url: str, key: str, db: asyncpg.Pool) -> float:
    """Seconds from a request's response to its record in usage_records (sent after a random
    pause: not in step with the writer's batches)."""
    await asyncio.sleep(random.uniform(0.0, 0.5))
    async with session.post(url, json=CHAT_BODY, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        request_id = r.headers["x-request-id"]
    answered = time.monotonic()
    while not await db.fetchval("SELECT 1 FROM usage_records WHERE request_id = $1", request_id):
        await asyncio.sleep(0.005)
    return time.monotonic() - answered


async def phase(gw: Gateway, rate: int, seconds: float, probes: int) -> dict[str, Any]:
    writer = gw.writer_pid()
    assert writer is not None, "no usage writer process"
    pg = procs.tree([gw.store_pids()["postgres"]], procs.all_procs())
    url = gw.base + "/v1/chat/completions"
    db = await asyncpg.create_pool(gw.database_url(), min_size=1, max_size=1)
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        sent = [0]
        pacers = [
            asyncio.create_task(_pace(session, url, gw.key, stop, sent)) for _ in range(rate // 20)
        ]
        await asyncio.sleep(1.0)  # settled into the load
        vol0, invol0, sent0 = *_switches(writer), sent[0]
        cpu_w0, cpu_pg0 = _cpu_s({writer}), _cpu_s(pg)
        began = time.monotonic()
        await asyncio.sleep(seconds)
        took = time.monotonic() - began
        vol1, invol1, sent1 = *_switches(writer), sent[0]
        cpu_w1, cpu_pg1 = _cpu_s({writer}), _cpu_s(pg)
        landed = [await _probe(session, url, gw.key, db) for _ in range(probes)]
        stop.set()
        await asyncio.gather(*pacers)
    await db.close()
    return {
        "rate": rate,
        "sent_rps": round((sent1 - sent0) / took, 1),
        "writer_wakeups_per_s": round((vol1 - vol0) / took, 1),
        "writer_involuntary_per_s": round((invol1 - invol0) / took, 1),
        "writer_cpu_ms_per_s": round((cpu_w1 - cpu_w0) * 1000 / took, 1),
        "postgres_cpu_ms_per_s": round((cpu_pg1 - cpu_pg0) * 1000 / took, 1),
        "landed_ms_p50": round(statistics.median(landed) * 1000, 1),
        "landed_ms_max": round(max(landed) * 1000, 1),
    }


def measure(
    rates: Sequence[int],
    seconds: float,
    probes: int,
    projects: dict[str, Path | None],
    redis: str = "single",
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="mb-cadence-") as tmp:
        upstream = FakeUpstream(Path(tmp))
        upstream.start()
        clusters = []
        gateways: dict[str, Gateway] = {}
        try:
            for name, path in projects.items():
                setup = RedisSetup()
                if redis == "cluster":
                    clusters.append(cluster.start_cluster(Path(tmp) / name))
                    setup = cluster.setup("cluster", clusters[-1])
                gateways[name] = Gateway(1, upstream.url, project=path, redis=setup)
            for gw in gateways.values():
                gw.start()
                gw.provision()
            for rate in rates:
                for name, gw in gateways.items():
                    row = {"project": name} | asyncio.run(phase(gw, rate, seconds, probes))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            return rows
        finally:
            for gw in gateways.values():
                gw.stop()
            for c in clusters:
                c.stop()
            upstream.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cadence")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="0,20,80", help="requests/s, multiples of 20")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--projects", default="this=.", help="name=checkout,... (.: this one)")
    parser.add_argument("--redis", choices=("single", "cluster"), default="single")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rates = [int(r) for r in args.rates.split(",") if r]
    projects: dict[str, Path | None] = {}
    for item in args.projects.split(","):
        name, _, path = item.partition("=")
        projects[name] = None if path in ("", ".") else Path(path).resolve()
    measure(rates, args.seconds, args.probes, projects, args.redis)


if __name__ == "__main__":
    main()

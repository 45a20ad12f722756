"""``make bench``: what ModelBridge adds on top of its upstream, measured on this machine.

    python -m bench.run [--quick] [--duration S] [--repeats N] [--workers 1[,2]] [--tests ...]

Starts the fake upstream (``python -m tests.fake_upstream --no-record``) and, per ``--workers``
value, a fresh ``modelbridge serve`` on embedded stores in a temp dir (or on the servers named by
``MODELBRIDGE_BENCH_DATABASE_URL`` / ``MODELBRIDGE_BENCH_REDIS_URL``) with a funded team key, so
each request is fully metered. Then, interleaved (direct, gateway, direct, gateway, ...):

* ``latency``     wrk, 4 connections, exponential think time (mean 50 ms): p50/p90/p99 and the
                  latency the gateway adds (gateway − direct percentile, paired per repetition);
* ``saturation``  wrk, 32 connections, closed loop: requests/s and latency;
* ``stream``      ``bench.stream_client``, 4 streams with think time: TTFB/TTFT/total added;
* ``surfaces``    ``bench.surfaces``: the latency test's load on each client surface (Chat
                  Completions, Responses, Messages native and translated both ways), one
                  gateway with an OpenAI and an Anthropic upstream: each surface's added p50
                  and its difference from Chat Completions' in the same repetition;
* ``writer``      ``bench.drain``: the usage writer's sustained insert rate, a backlog of 50,000
                  records in 50 streams drained into PostgreSQL, usage_records partitioned by
                  month and unpartitioned, interleaved: records/s and records per CPU-second;

and for every run the CPU time (utime + stime from /proc) of the gateway's processes, of its
Redis and PostgreSQL, and of the fake upstream, per response. Every gateway response must be a
200 and every one must leave a usage record in PostgreSQL; both are checked. Results:
``bench/results/<time>.json`` and ``.md``; the table is printed, with the ratios to the targets.

The 2-core machine is shared by the load generator, the fake, the gateway and its stores, and by
whatever else runs: foreign CPU load is measured and waited out (``--max-foreign``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import cluster, drain, load, procs, report, surfaces
from bench.session import Plan, Session
from bench.stack import FakeUpstream, Gateway, RedisSetup

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = ("latency", "saturation", "stream", "surfaces", "writer")
SESSION_TESTS = ("latency", "saturation", "stream")  # the rest run on a gateway of their own


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run, ~40 s: 1 repetition of 3 s runs, 1 s warm-up",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per saturation / stream run (default 10; 3 with --quick); "
        "latency runs last 1.5× as long",
    )
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 3; 1 quick)")
    p.add_argument(
        "--workers",
        default="1",
        help="gateway worker counts to measure, comma separated (e.g. 1,2)",
    )
    p.add_argument("--tests", default=",".join(TESTS), help="subset of " + ",".join(TESTS))
    p.add_argument(
        "--redis",
        default="single,cluster",
        help="Redis setups, comma separated: " + ", ".join(cluster.SETUPS) + " (a cluster is "
        "3 masters + 3 replicas on loopback; cluster-redis-py sends the hot path's scripts "
        "through redis-py's RedisCluster, cluster-wait sets redis.wait_replicas: 1)",
    )
    p.add_argument("--cluster-workers", type=int, default=2, help="gateway processes on a cluster")
    p.add_argument("--lat-conns", type=int, default=4)
    p.add_argument("--lat-think-ms", type=float, default=50.0)
    p.add_argument("--sat-conns", type=int, default=32)
    p.add_argument("--stream-conc", type=int, default=4)
    p.add_argument("--stream-think-ms", type=float, default=50.0)
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="cores foreign processes may use during a run before it is redone",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait for foreign load to stop before a pair of runs",
    )
    p.add_argument("--retries", type=int, default=1, help="re-measure a disturbed pair N times")
    p.add_argument(
        "--project",
        type=Path,
        default=None,
        help="benchmark the gateway of another checkout (put first on PYTHONPATH, run with "
        "this venv), e.g. to compare a change with the base",
    )
    p.add_argument(
        "--key-limits",
        action="store_true",
        help="the bench key has rpm and tpm set (never reached): the hold keeps rate logs",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    a = p.parse_args(argv)
    a.duration = a.duration or (3 if a.quick else 10)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.workers = [int(w) for w in str(a.workers).split(",") if w.strip()]
    a.tests = tuple(t for t in a.tests.split(",") if t)
    a.redis = tuple(r for r in a.redis.split(",") if r)
    if set(a.redis) - set(cluster.SETUPS) or not a.redis:
        p.error(f"--redis: choose from {', '.join(cluster.SETUPS)}")
    unknown = set(a.tests) - set(TESTS)
    if unknown or not a.tests:
        p.error(f"unknown tests {sorted(unknown)}; choose from {', '.join(TESTS)}")
    return a


def make_plan(a: argparse.Namespace) -> Plan:
    return Plan(
        repeats=a.repeats,
        duration=a.duration,
        lat_duration=math.ceil(a.duration * 1.5),
        lat_conns=a.lat_conns,
        lat_think_ms=a.lat_think_ms,
        sat_conns=a.sat_conns,
        stream_conc=a.stream_conc,
        stream_think_ms=a.stream_think_ms,
        warmup=1.0 if a.quick else 3.0,
        tests=tuple(t for t in a.tests if t in SESSION_TESTS),
        max_foreign=a.max_foreign,
        quiet_wait=a.quiet_wait,
        retries=0 if a.quick else a.retries,
    )


def meta(a: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "loadavg_before": [round(x, 2) for x in procs.loadavg()],
        "wrk": ((wrk.stdout or wrk.stderr).splitlines() or ["wrk"])[0].split(" [")[0],
        "plan": dataclasses.asdict(plan),
        "workers": a.workers,
        "project": str(a.project.resolve()) if a.project else str(Path(__file__).parent.parent),
        "stores": "external" if os.environ.get("MODELBRIDGE_BENCH_DATABASE_URL") else "embedded",
    }


def bench_gateway(
    plan: Plan,
    fake: FakeUpstream,
    workers: int,
    body: Path,
    project: Path | None,
    redis: RedisSetup | None = None,
    key_limits: bool = False,
) -> dict[str, Any]:
    controls = {"rpm": 10**9, "tpm": 10**15} if key_limits else None
    gw = Gateway(workers, fake.url, project, redis, controls)
    log(f"starting modelbridge serve --workers {workers} on :{gw.port} (data {gw.data_dir})")
    stopped: dict[str, Any] = {}
    try:
        began = time.monotonic()
        gw.start()
        gw.provision()
        log(f"{gw.label} ready in {time.monotonic() - began:.1f} s; stores {gw.store_pids()}")
        result = Session(plan, fake, gw, body, log=log).run()
    except BaseException:
        log("gateway log tail:\n" + gw.log_tail())
        raise
    finally:
        stopped = gw.stop()
        log(f"{gw.label} stopped: {stopped}")
    result["stop"] = stopped
    return result


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path, str]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = report.markdown(result)
    if "surfaces" in result:
        found = result["surfaces"]
        md += "\n## Client surfaces (latency load, 1 worker)\n\n"
        md += surfaces.markdown(found["table"], found["verify"])
    if "writer" in result:
        md += "\n## Usage writer: sustained insert rate\n\n" + drain.markdown(result["writer"])
    result["summary"] = {s["label"]: report.summarize(s) for s in result["sessions"]}
    paths = out / f"{stamp}.json", out / f"{stamp}.md"
    paths[0].write_text(json.dumps(result, indent=1, default=str))
    paths[1].write_text(md)
    return paths[0], paths[1], md


def stop_cleanly() -> None:
    """SIGTERM and SIGINT (even when started in the background, where SIGINT is ignored) unwind
    through the ``finally`` blocks, which stop the gateway, its stores and the fake upstream."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    stop_cleanly()
    load.ensure_wrk()
    plan = make_plan(a)
    result: dict[str, Any] = {"meta": meta(a, plan), "sessions": []}
    log(f"load average {result['meta']['loadavg_before']}; plan {dataclasses.asdict(plan)}")
    with tempfile.TemporaryDirectory(prefix="mb-bench-") as tmp:
        body = load.write_body(Path(tmp))
        fake = FakeUpstream(Path(tmp))
        fake.start()
        log(f"fake upstream on {fake.url} (pid {fake.pid})")
        clustered = [name for name in a.redis if name != "single"] if plan.tests else []
        redis_cluster = cluster.start_cluster(Path(tmp)) if clustered else None
        try:
            if "surfaces" in a.tests:
                result["surfaces"] = surfaces.run(Path(tmp), plan.duration, plan.repeats, log)
            if "writer" in a.tests:
                records = 10_000 if a.quick else 50_000
                result["writer"] = drain.run(Path(tmp) / "drain", plan.repeats, log, records)
            if "single" in a.redis and plan.tests:
                for workers in a.workers:
                    result["sessions"].append(
                        bench_gateway(plan, fake, workers, body, a.project, key_limits=a.key_limits)
                    )
            for name in clustered:
                assert redis_cluster is not None
                redis_cluster.flush()  # the previous gateway's streams went to its own database
                setup = cluster.setup(name, redis_cluster)
                result["sessions"].append(
                    bench_gateway(
                        plan, fake, a.cluster_workers, body, a.project, setup, a.key_limits
                    )
                )
        finally:
            fake.stop()
            if redis_cluster is not None:
                redis_cluster.stop()
    result["meta"]["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    json_path, md_path, md = write(result, a.out)
    print("\n" + md)
    log(f"wrote {json_path} and {md_path}")
    checks = [s["verify"]["ok"] for s in result["sessions"]]
    checks += [result["surfaces"]["verify"]["ok"]] if "surfaces" in result else []
    checks += [result["writer"]["verify"]["ok"]] if "writer" in result else []
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())

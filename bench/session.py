"""One benchmark session: the direct fake upstream and one gateway, measured interleaved.

For every repetition and test, the direct run and the gateway run follow each other (a "pair"),
so slow drift of the shared machine hits both. Before each pair the session waits for foreign CPU
load to go away; a pair during which a foreign process used more than ``--max-foreign`` cores is
measured again (``--retries``), and kept as suspect after the last try.

After each gateway run the session waits until the usage writer has moved every usage record
into PostgreSQL (``modelbridge_usage_events_pending`` back to 0): the CPU of the gateway and its
stores is counted up to that point, so the per-request figure includes the whole metering path.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, procs
from bench.stack import FakeUpstream, Gateway, http

_STATUS = re.compile(
    r'^modelbridge_requests_total\{.*endpoint="/v1/chat/completions".*status="(\d+)"'
)
_OVERHEAD = 'modelbridge_gateway_overhead_seconds_{}{{endpoint="/v1/chat/completions"}}'
PENDING = "modelbridge_usage_events_pending"
GW_GROUPS = ("gateway", "writer", "redis", "postgres")  # see Gateway.groups()


@dataclass(frozen=True)
class Plan:
    repeats: int
    duration: float
    lat_duration: float
    lat_conns: int
    lat_think_ms: float
    sat_conns: int
    stream_conc: int
    stream_think_ms: float
    warmup: float
    tests: tuple[str, ...]
    max_foreign: float
    quiet_wait: float
    retries: int
    pause: float = 0.5


def served(metrics: dict[str, float]) -> dict[str, int]:
    """Chat completions the gateway answered, by HTTP status (from /metrics)."""
    out: dict[str, int] = {}
    for name, value in metrics.items():
        m = _STATUS.match(name)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(value)
    return out


def _pending(metrics: dict[str, float]) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith(PENDING)))


@dataclass
class Session:
    plan: Plan
    fake: FakeUpstream
    gateway: Gateway
    body: Path
    log: Any = print
    runs: list[dict[str, Any]] = field(default_factory=list)
    discarded: list[dict[str, Any]] = field(default_factory=list)
    client_ok: int = 0  # every successful response the gateway gave to this driver
    pending_seen: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        gw = self.gateway
        self.direct = load.Target("direct", self.fake.url + "/v1/chat/completions", "")
        self.target = load.Target(gw.label, gw.base + "/v1/chat/completions", gw.key)
        roots = self.gateway.groups().roots | {"fake": [self.fake.pid]}
        self.groups = procs.Groups(roots)

    # --- checks ------------------------------------------------------------------------------
    def sanity(self) -> None:
        for t in (self.direct, self.target):
            status, body = http("POST", t.url, load.CHAT_BODY, t.key or None)
            usage = body.get("usage") if isinstance(body, dict) else None
            if status != 200 or not usage or not body["choices"][0]["message"]["content"]:
                raise RuntimeError(f"sanity request to {t.name}: HTTP {status} {str(body)[:300]}")
        self.client_ok += 1

    def quiet_gate(self) -> float:
        """Wait (up to plan.quiet_wait s) until foreign processes leave the CPU alone."""
        began = time.monotonic()
        while True:
            cores, top = procs.foreign_now(self.groups)
            if cores <= self.plan.max_foreign or time.monotonic() - began > self.plan.quiet_wait:
                return round(time.monotonic() - began, 1)
            names = ", ".join(f"{p['name']}:{p['pid']} {p['cores']:.2f}" for p in top[:3])
            self.log(f"  machine busy with foreign load ({cores:.2f} cores: {names}); waiting")
            time.sleep(2)

    def drain(self, timeout: float = 60) -> tuple[dict[str, float], float]:
        """Poll /metrics until no usage record waits for PostgreSQL; (last metrics, seconds).

        The gauge is set by the usage writer after each of its steps (at least every 200 ms), so
        a single 0 may predate the last settles: wait for 0 on readings at least 0.3 s apart."""
        began = time.monotonic()
        zero_since = None
        while True:
            m = self.gateway.metrics()
            pending, now = _pending(m), time.monotonic()
            self.pending_seen.append(pending)
            zero_since = (zero_since or now) if pending == 0 else None
            if (zero_since and now - zero_since >= 0.3) or now - began > timeout:
                return m, round(now - began, 2)
            time.sleep(0.1)

    def wait_for_records(self, served_ok: int, timeout: float = 30) -> dict[str, int]:
        """Usage records of the bench key in PostgreSQL, once they number ``served_ok`` (or
        after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.gateway.usage_records()
            if sum(records.values()) >= served_ok or time.monotonic() > deadline:
                return records
            time.sleep(0.5)

    # --- one measured run --------------------------------------------------------------------
    def _load(self, t: load.Target, test: str) -> dict[str, Any]:
        p = self.plan
        if test == "latency":
            return load.wrk(t, self.body, p.lat_conns, p.lat_duration, p.lat_think_ms)
        if test == "saturation":
            return load.wrk(t, self.body, p.sat_conns, p.duration)
        if test == "stream":
            return load.streams(t, p.stream_conc, p.stream_think_ms, p.duration)
        raise ValueError(test)

    def measure(self, t: load.Target, test: str) -> dict[str, Any]:
        is_gw = t is self.target
        m0 = self.gateway.metrics() if is_gw else None
        a = procs.Snapshot.take()
        result = self._load(t, test)
        b = procs.Snapshot.take()
        run: dict[str, Any] = {"test": test, "target": t.name, "load": result}
        run["cpu"] = procs.usage(a, b, self.groups)
        ok = result["requests_ok"] + (result.get("warmup_streams", 0) if test == "stream" else 0)
        if m0 is not None:
            m1, run["drain_s"] = self.drain()
            c = procs.Snapshot.take()
            whole = procs.usage(a, c, self.groups)  # up to the last usage record in PostgreSQL
            for g in GW_GROUPS:
                if f"{g}_cpu_s" in whole:
                    run["cpu"][f"{g}_cpu_s"] = whole[f"{g}_cpu_s"]
            run["server"] = self._server_delta(m0, m1)
            self.client_ok += ok
        cpu = run["cpu"]
        for g in (*GW_GROUPS, "fake"):
            if f"{g}_cpu_s" in cpu and ok:
                cpu[f"{g}_ms_per_req"] = round(1000 * cpu[f"{g}_cpu_s"] / ok, 4)
        if is_gw and ok:  # the gateway's own processes: serving + usage writer, stores apart
            tree = cpu.get("gateway_cpu_s", 0) + cpu.get("writer_cpu_s", 0)
            cpu["gateway_tree_ms_per_req"] = round(1000 * tree / ok, 4)
        run["suspect"] = run["cpu"]["foreign_cores"] > self.plan.max_foreign
        return run

    @staticmethod
    def _server_delta(m0: dict[str, float], m1: dict[str, float]) -> dict[str, Any]:
        s0, s1 = served(m0), served(m1)
        by_status = {k: v - s0.get(k, 0) for k, v in s1.items() if v - s0.get(k, 0)}
        count = m1.get(_OVERHEAD.format("count"), 0) - m0.get(_OVERHEAD.format("count"), 0)
        total = m1.get(_OVERHEAD.format("sum"), 0) - m0.get(_OVERHEAD.format("sum"), 0)
        return {
            "responses_by_status": by_status,
            "non_200": sum(v for k, v in by_status.items() if k != "200"),
            "overhead_mean_ms": round(1000 * total / count, 4) if count else None,
        }

    # --- the whole session -------------------------------------------------------------------
    def warm_up(self) -> None:
        if self.plan.warmup <= 0:
            return
        for t in (self.direct, self.target):
            r = load.wrk(t, self.body, self.plan.sat_conns, self.plan.warmup)
            if t is self.target:
                self.client_ok += r["requests_ok"]
        self.drain()

    def run(self) -> dict[str, Any]:
        p = self.plan
        self.sanity()
        self.log(f"{self.target.name}: sanity OK; warm-up {p.warmup:g} s per target")
        self.warm_up()
        for rep in range(1, p.repeats + 1):
            for test in p.tests:
                self._pair(rep, test)
        return self.finish()

    def _pair(self, rep: int, test: str) -> None:
        for attempt in range(self.plan.retries + 1):
            waited = self.quiet_gate()
            pair = []
            for t in (self.direct, self.target):
                time.sleep(self.plan.pause)
                run = self.measure(t, test) | {
                    "rep": rep,
                    "attempt": attempt,
                    "quiet_wait_s": waited,
                }
                self.log("  " + oneline(run))
                pair.append(run)
            if not any(r["suspect"] for r in pair) or attempt == self.plan.retries:
                self.runs += pair
                return
            self.log(f"  rep {rep} {test}: foreign CPU load during the pair; measuring it again")
            self.discarded += pair

    def finish(self) -> dict[str, Any]:
        """Check that every served request left exactly one usage record in PostgreSQL."""
        metrics, drain_s = self.drain()
        by_status = served(metrics)
        served_ok = by_status.get("200", 0)
        began = time.monotonic()
        records = self.wait_for_records(served_ok)
        waited = round(time.monotonic() - began, 2)
        n_records = sum(records.values())
        # wrk does not count the requests still in flight when it stops (one per connection)
        gw_runs = [r for r in self.runs + self.discarded if r["target"] == self.target.name]
        margin = sum(r["load"]["conns"] for r in gw_runs if r["load"]["tool"] == "wrk")
        margin += self.plan.sat_conns  # the warm-up's
        verify = {
            "client_ok_responses": self.client_ok,
            "gateway_responses_by_status": by_status,
            "usage_records": n_records,
            "usage_records_by_source_status": records,
            "records_equal_served": n_records == served_ok,
            "records_minus_client_ok": n_records - self.client_ok,
            "in_flight_margin": margin,
            "records_within_margin": 0 <= n_records - self.client_ok <= margin,
            "pending_at_end": _pending(metrics),
            "pending_max_seen": max(self.pending_seen, default=0),
            "final_drain_s": drain_s,
            "records_waited_s": waited,
        }
        verify["ok"] = bool(
            verify["records_equal_served"]
            and verify["records_within_margin"]
            and verify["pending_at_end"] == 0
            and set(by_status) <= {"200"}
        )
        return {
            "label": self.target.name,
            "workers": self.gateway.workers,
            "runs": self.runs,
            "discarded_runs": self.discarded,
            "verify": verify,
        }


def oneline(r: dict[str, Any]) -> str:
    x, c = r["load"], r["cpu"]
    s = f"rep{r['rep']} {r['test']:<10} {r['target']:<12} "
    if x["tool"] == "wrk":
        lat = x["latency_ms"]
        s += f"{x['rps']:>8.1f} req/s p50 {lat['p50']:.3f} p90 {lat['p90']:.3f}"
        s += f" p99 {lat['p99']:.3f} ms"
    else:
        s += (
            f"{x['streams_per_s']:>6.1f} str/s ttfb {x['ttfb_ms']['p50']:.3f} "
            f"ttft {x['ttft_ms']['p50']:.3f} total {x['total_ms']['p50']:.3f} ms"
        )
    s += f" err {x['errors']}"
    if "server" in r:
        s += f"/{r['server']['non_200']}"
    for g in (*GW_GROUPS, "fake"):
        if f"{g}_ms_per_req" in c and (g == "fake") != ("server" in r):
            s += f" {g} {c[g + '_ms_per_req']:.3f}"
    if "server" in r:
        s += f" ms/req drain {r['drain_s']}s"
    s += f" foreign {c['foreign_cores']:.2f}"
    return s + (" SUSPECT" if r["suspect"] else "")

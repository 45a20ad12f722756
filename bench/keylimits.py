"""What a key's rate limits add to a request's latency, measured request by request:
``python -m bench.keylimits [--requests N] [--think-ms MS]``.

One gateway (1 worker, embedded stores, full metering) and two keys of one funded team: ``plain``
(no controls) and ``limited`` (``rpm`` and ``tpm`` set, never reached: every hold keeps the key's
rate log, every settle corrects its tokens, every answer carries the ``x-ratelimit-*`` headers).
Three keep-alive connections — to the fake upstream directly, through the gateway with each key —
take turns in a shuffled order, one request at a time with an exponential think time between
requests (low load), so the three see the same machine at the same moments: the drift of a
shared machine, which moves ``bench.surfaces``' 8-second runs by tenths of a millisecond, falls
on all three alike. Reported: each side's p50 and p90, the added p50 (gateway − direct) of each
key, and what the limits add (limited p50 − plain p50; issue 12's target is ≤ 0.05 ms).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import load
from bench.stack import FakeUpstream, Gateway

LIMITS = {"rpm": 10**9, "tpm": 10**15}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(workdir: Path, requests: int, think_ms: float, seed: int = 1) -> dict[str, list[float]]:
    fake = FakeUpstream(workdir)
    fake.start()
    gw = Gateway(1, fake.url)
    try:
        gw.start()
        gw.provision(limited=LIMITS)
        body = json.dumps(load.CHAT_BODY)
        sides = {
            "direct": (http.client.HTTPConnection("127.0.0.1", fake.port), ""),
            "plain": (http.client.HTTPConnection("127.0.0.1", gw.port), gw.key),
            "limited": (http.client.HTTPConnection("127.0.0.1", gw.port), gw.limited_key),
        }

        def one(name: str) -> float:
            conn, key = sides[name]
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            started = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, headers)
            response = conn.getresponse()
            response.read()
            took = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise RuntimeError(f"{name}: HTTP {response.status}")
            return took

        rng = random.Random(seed)
        names = list(sides)
        for _ in range(100):  # warm-up
            for name in names:
                one(name)
        out: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(requests):
            rng.shuffle(names)
            for name in names:
                out[name].append(one(name))
                time.sleep(rng.expovariate(1000 / think_ms))
    finally:
        gw.stop()
        fake.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.keylimits", description=__doc__)
    p.add_argument("--requests", type=int, default=3000, help="per side")
    p.add_argument("--think-ms", type=float, default=12.0, help="mean pause between requests")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mb-keylimits-") as tmp:
        got = run(Path(tmp), a.requests, a.think_ms)
    p50 = {name: statistics.median(values) for name, values in got.items()}
    print(f"\n{a.requests} requests per side, one at a time, think time {a.think_ms} ms\n")
    print("| side | p50 ms | p90 ms | added p50 ms |\n|---|---|---|---|")
    for name, values in got.items():
        added = "" if name == "direct" else f"{p50[name] - p50['direct']:+.3f}"
        print(f"| {name} | {p50[name]:.3f} | {quantile(values, 0.9):.3f} | {added} |")
    print(f"\nwhat the key's rpm and tpm add to the p50: {p50['limited'] - p50['plain']:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

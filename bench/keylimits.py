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

``--client raw`` (the default) times each request on a plain socket, from the request's one
``sendall`` to the last byte of the answer's body, finding only its ``Content-Length``: so the
figure is the gateway's, not the client's. ``--client http.client`` uses the standard library's
client, whose header parser (``email.parser``) takes ~33 µs more on this machine for an answer
with the six ``x-ratelimit-*`` headers than for one without: part of what a Python client pays,
not of what the gateway adds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import socket
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


_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


class RawConnection:
    """One keep-alive connection timed on the socket: the request in one ``sendall``, the answer
    read until its ``Content-Length`` is in (a chunked answer is not expected here)."""

    def __init__(self, port: int, key: str, body: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def one(self) -> tuple[float, bytes]:
        """(milliseconds, the status line) of one request."""
        started = time.perf_counter()
        self.sock.sendall(self.request)
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end < 0:
                continue
            found = _LENGTH.search(data, 0, end + 2)
            if found is None:
                raise RuntimeError("an answer without Content-Length")
            if len(data) >= end + 4 + int(found.group(1)):
                took = (time.perf_counter() - started) * 1000
                return took, data[: data.find(b"\r\n")]


def run(
    workdir: Path, requests: int, think_ms: float, seed: int = 1, client: str = "raw"
) -> dict[str, list[float]]:
    fake = FakeUpstream(workdir)
    fake.start()
    gw = Gateway(1, fake.url)
    try:
        gw.start()
        gw.provision(limited=LIMITS)
        body = json.dumps(load.CHAT_BODY)
        keys = {"direct": "", "plain": gw.key, "limited": gw.limited_key}
        ports = {"direct": fake.port, "plain": gw.port, "limited": gw.port}
        raw = {n: RawConnection(ports[n], k, body.encode()) for n, k in keys.items()}
        sides = {
            "direct": (http.client.HTTPConnection("127.0.0.1", fake.port), ""),
            "plain": (http.client.HTTPConnection("127.0.0.1", gw.port), gw.key),
            "limited": (http.client.HTTPConnection("127.0.0.1", gw.port), gw.limited_key),
        }

        def one(name: str) -> float:
            if client == "raw":
                took, status = raw[name].one()
                if b" 200 " not in status:
                    raise RuntimeError(f"{name}: {status!r}")
                return took
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
    p.add_argument("--client", choices=("raw", "http.client"), default="raw")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mb-keylimits-") as tmp:
        got = run(Path(tmp), a.requests, a.think_ms, client=a.client)
    p50 = {name: statistics.median(values) for name, values in got.items()}
    print(f"\n{a.requests} requests per side, one at a time, think time {a.think_ms} ms,")
    print(f"client {a.client}\n")
    print("| side | p50 ms | p90 ms | added p50 ms |\n|---|---|---|---|")
    for name, values in got.items():
        added = "" if name == "direct" else f"{p50[name] - p50['direct']:+.3f}"
        print(f"| {name} | {p50[name]:.3f} | {quantile(values, 0.9):.3f} | {added} |")
    print(f"\nwhat the key's rpm and tpm add to the p50: {p50['limited'] - p50['plain']:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

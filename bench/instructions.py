"""Instructions per request: the serving process's cost counted by callgrind, not timed.

    python -m bench.instructions DIR [DIR ...] [--requests N] [--repeats R] [--key-limits]
                                 [--stream [--pieces P]]

Wall-clock and CPU-time figures on a shared 2-core machine move by more than the changes they
are meant to judge. Counted instructions do not: the gateway (``modelbridge serve``, 1 worker,
embedded stores, a funded team key: the full metering path) runs under ``valgrind
--tool=callgrind`` with instrumentation off until it has started and served a warm-up; then
instrumentation is switched on (``callgrind_control -i on``) for ``N`` plain chat completions sent
one at a time on one keep-alive connection (``--stream``: streamed ones, read to their end), and
off again (``--pieces P``: each streamed answer carries ``P`` content chunks, not the fake's 6,
so ``P + 2`` chunks with the role and finish ones). The instructions the serving process
executed in that span, less what it executes with no request over the same wall time (counted
first, ``IDLE_S`` seconds: the timers and ticks, whose share per request depends on how slowly
callgrind and the machine run), divided by ``N``, are what one request costs it — the Python
interpreter, the C extensions (uvloop, orjson, hiredis, httptools) and the kernel entries it
makes, whatever else runs on the machine. The stores and the usage writer are not counted
(their CPU is ``bench.hold_cost``'s and ``bench.drain``'s business).

Each DIR is a checkout run on this venv (``PYTHONPATH``, as ``bench.ab`` does), so two commits
can be compared in one sitting. Repeats of one checkout differ by under 1 % when the process is
quiet when idle and by up to 3 % when it is not (the idle rate is subtracted, not removed), so
quote the median of several and call a difference under 3 % noise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stack
from bench.stack import FakeUpstream, Gateway

BODY = {
    "model": stack.MODEL,
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 16,
}
WARMUP = 50
IDLE_S = 5.0  # counted with no request, to take the timers' share out of the requests' span


class CallgrindGateway(Gateway):
    """A :class:`Gateway` whose ``serve`` runs under callgrind, instrumentation off at start."""

    def __init__(
        self, project: Path, upstream_url: str, out: Path, key_controls: dict[str, Any] | None
    ) -> None:
        super().__init__(1, upstream_url, project, None, key_controls)
        self.out = out
        self.wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        self.wrapper += ["--trace-children=no", f"--callgrind-out-file={out}"]

    def start(self, timeout: float = 900) -> None:  # under callgrind, a start takes a minute
        super().start(timeout)


def _parts(out: Path) -> dict[int, int]:
    """The instructions of each dump callgrind wrote: {part number: total}."""
    parts: dict[int, int] = {}
    for dump in out.parent.glob(out.name + "*"):
        part, total = 0, 0
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("part:"):
                part = int(line.split()[1])
            elif line.startswith("totals:"):
                total = int(line.split()[1])
        parts[part] = total
    return parts


@dataclass(frozen=True)
class Count:
    per_request: float  # the requests' span, less the idle rate over its wall time
    idle_per_s: float  # what the process does with no request (timers, ticks)
    raw_per_request: float  # the requests' span, all of it


def _body(stream: bool, pieces: int) -> dict[str, Any]:
    """The request; ``pieces``: the fake's content pieces, asked with a marker in the prompt."""
    if not stream:
        return BODY
    if not pieces:
        return {**BODY, "stream": True}
    marker = json.dumps({"content_pieces": [f" w{i}" for i in range(pieces)]})
    message = {"role": "user", "content": f"Say hello. [[fake:{marker}]]"}
    return {**BODY, "messages": [message], "max_tokens": pieces + 16, "stream": True}


def measure(
    project: Path,
    requests: int,
    key_limits: bool,
    workdir: Path,
    stream: bool = False,
    pieces: int = 0,
) -> Count:
    out = workdir / f"callgrind-{project.name}-{time.monotonic_ns()}.out"
    fake = FakeUpstream(workdir)
    fake.start()
    controls = {"rpm": 10**9, "tpm": 10**15} if key_limits else None
    gw = CallgrindGateway(project, fake.url, out, controls)
    control = ["callgrind_control"]
    try:
        gw.start()
        gw.provision()
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
        headers = {"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json"}
        body = json.dumps(_body(stream, pieces))

        def one() -> None:
            conn.request("POST", "/v1/chat/completions", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

        for _ in range(WARMUP):
            one()
        time.sleep(1)
        subprocess.run([*control, "-i", "on", str(gw.pid)], check=True, capture_output=True)
        started = time.monotonic()
        time.sleep(IDLE_S)
        subprocess.run([*control, "-d", str(gw.pid)], check=True, capture_output=True)
        idle_s = time.monotonic() - started
        started = time.monotonic()
        for _ in range(requests):
            one()
            time.sleep(0.002)  # the settle's reply comes back before the next request
        subprocess.run([*control, "-d", str(gw.pid)], check=True, capture_output=True)
        busy_s = time.monotonic() - started
        subprocess.run([*control, "-i", "off", str(gw.pid)], check=True, capture_output=True)
    finally:
        gw.stop()
        fake.stop()
    parts = _parts(out)
    idle_rate = parts.get(1, 0) / idle_s
    busy = parts.get(2, 0)
    return Count((busy - idle_rate * busy_s) / requests, idle_rate, busy / requests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("dirs", nargs="+", type=Path, help="checkouts to measure")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--key-limits", action="store_true", help="the key has rpm and tpm set")
    p.add_argument("--stream", action="store_true", help="streamed chat completions")
    p.add_argument("--pieces", type=int, default=0, help="content chunks per stream (fake: 6)")
    a = p.parse_args(argv)
    results: dict[str, list[Count]] = {}
    with tempfile.TemporaryDirectory(prefix="mb-instr-") as tmp:
        for _ in range(a.repeats):
            for project in a.dirs:
                c = measure(
                    project.resolve(), a.requests, a.key_limits, Path(tmp), a.stream, a.pieces
                )
                results.setdefault(str(project), []).append(c)
                print(
                    f"{project}: {c.per_request:,.0f} instructions per request"
                    f" ({c.raw_per_request:,.0f} with the timers; idle {c.idle_per_s:,.0f}/s)",
                    flush=True,
                )
    print("\n| checkout | instructions per request (median) | runs | idle per second |")
    print("|---|---|---|---|")
    first = 0.0
    for project, counts in results.items():
        runs = sorted(c.per_request for c in counts)
        med = runs[len(runs) // 2]
        first = first or med
        idle = sorted(c.idle_per_s for c in counts)[len(counts) // 2]
        listed = ", ".join(f"{c.per_request:,.0f}" for c in counts)
        print(f"| {project} | {med:,.0f} ({med / first:.3f}×) | {listed} | {idle:,.0f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

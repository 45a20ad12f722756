"""Where the gateway's CPU goes under load: ``python -m bench.profile [--mode saturation]``.

Starts the fake upstream and a gateway as ``bench.run`` does, drives it with wrk (``saturation``:
32 connections closed loop; ``latency``: 4 connections with 50 ms think time) and samples the
gateway process with py-spy (not a project dependency: ``--py-spy PATH``, default the one on
PATH; e.g. ``python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy``). Prints the
functions with the most samples, inclusive (anywhere on the stack) and exclusive (leaf), and the
share per area (proxy steps, libraries), and keeps the raw collapsed stacks (flamegraph input).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench import load
from bench.stack import serving

RESULTS = Path(__file__).resolve().parent / "results"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")
AREAS = (  # (label, pattern on "function (file)"), first match wins, checked leaf to root
    ("tiktoken prompt count", r"gateway/tokens\.py|tiktoken"),
    ("prometheus metrics", r"prometheus_client"),
    ("Redis script client (hold/settle)", r"gateway/scriptclient\.py|hiredis"),
    ("redis-py", r"[(/]redis/"),
    ("asyncpg (usage writer)", r"asyncpg"),
    ("usage writer (own code)", r"usage_writer\.py"),
    ("aiohttp client (upstream)", r"aiohttp/client|aiohttp/connector|aiohttp/streams"),
    ("aiohttp server", r"aiohttp/"),
    ("gateway code", r"gateway/|policies/"),
    ("asyncio / uvloop", r"asyncio|uvloop"),
)


_IDLE_LEAF = "_worker (concurrent/futures/thread.py"


def parse_stacks(path: Path) -> list[tuple[list[str], int]]:
    """Collapsed stacks, less an idle thread pool's samples: py-spy counts a worker waiting on
    its queue as active, although /proc shows the thread uses no CPU."""
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit() and not frames.split(";")[-1].startswith(_IDLE_LEAF):
            stacks.append((frames.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def area(stack: list[str]) -> str:
    for frame in reversed(stack):  # leaf first
        for label, pattern in AREAS:
            if re.search(pattern, frame):
                return label
    return "other"


def summarize(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(n for _, n in stacks) or 1
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, n in stacks:
        names = [short(f) for f in frames]
        for name in set(names):
            inclusive[name] += n
        exclusive[names[-1]] += n
        areas[area(frames)] += n
    out = [f"{total} samples", "", "share by area (leaf-most frame that matches):"]
    out += [f"  {100 * n / total:5.1f}%  {label}" for label, n in areas.most_common()]
    out += ["", f"top {top} inclusive (anywhere on the stack):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out += ["", f"top {top} exclusive (leaf):"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in exclusive.most_common(top)]
    return "\n".join(out)


def drive(mode: str, target: load.Target, body: Path, seconds: int) -> dict:
    if mode == "saturation":
        return load.wrk(target, body, 32, seconds)
    return load.wrk(target, body, 4, seconds, think_ms=50)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("saturation", "latency"), default="saturation")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy-venv/bin/py-spy")
    p.add_argument("--project", type=Path, default=None, help="profile another checkout's gateway")
    a = p.parse_args()
    if not Path(a.py_spy).exists():
        sys.exit(f"py-spy not found at {a.py_spy}: install it outside the project venv")
    load.ensure_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"profile-{a.mode}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    with tempfile.TemporaryDirectory(prefix="mb-profile-") as tmp:
        body = load.write_body(Path(tmp))
        with serving(Path(tmp), a.project) as (_, gw):
            target = load.Target(gw.label, gw.base + "/v1/chat/completions", gw.key)
            load.wrk(target, body, 32, 3)  # warm-up
            result: dict = {}
            driver = threading.Thread(
                target=lambda: result.update(drive(a.mode, target, body, a.seconds + 2))
            )
            driver.start()
            time.sleep(1)
            cmd = [a.py_spy, "record", "--pid", str(gw.pid), "--duration", str(a.seconds)]
            cmd += ["--rate", str(a.rate), "--format", "raw", "--output", str(raw)]
            subprocess.run(cmd, check=True, capture_output=True)
            driver.join()
    print(f"{a.mode}: {result.get('rps')} req/s under py-spy (sampling slows the gateway)")
    print(summarize(parse_stacks(raw), a.top))
    print(f"\nraw collapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

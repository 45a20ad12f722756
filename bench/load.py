"""The load generators, each in a process of its own: wrk (with ``wrk_post.lua``) for the
non-streaming tests, ``bench.stream_client`` for streams."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {
            "role": "system",
            "content": "You are a concise assistant that answers questions "
            "about software architecture.",
        },
        {
            "role": "user",
            "content": "In two or three sentences, explain what an API gateway in "
            "front of several LLM providers does, and why a team would "
            "put one in front of its applications.",
        },
    ],
    "temperature": 0.2,
    "max_tokens": 128,
}
STREAM_CONTENT_CHUNKS = 6  # tests.fake_upstream's DEFAULT_PIECES


@dataclass(frozen=True)
class Target:
    name: str  # "direct" or the gateway's label
    url: str  # the /v1/chat/completions URL (or another surface's)
    key: str
    headers: str = ""  # extra headers for wrk: "Name: value|Name: value"


def ensure_wrk() -> str:
    """wrk's path, installing the Debian package when it is missing (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is missing: apt-get install -y wrk", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed and could not be installed: apt-get install wrk")
    return found


def write_body(directory: Path) -> Path:
    path = directory / "chat.json"
    path.write_text(json.dumps(CHAT_BODY))
    return path


def wrk(
    target: Target, body: Path, conns: int, duration: float, think_ms: float = 0.0
) -> dict[str, Any]:
    env = dict(
        os.environ,
        BENCH_BODY_FILE=str(body),
        BENCH_API_KEY=target.key,
        BENCH_THINK_MS=str(think_ms),
        BENCH_HEADERS=target.headers,
    )
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{math.ceil(duration)}s", "--timeout", "10s"]
    cmd += ["-s", str(HERE / "wrk_post.lua"), target.url]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-1000:]}")
    w = json.loads(line.removeprefix("WRK_JSON "))
    errors = w["errors"]
    ok = w["requests"] - errors["status"]
    seconds = w["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "conns": conns,
        "think_ms": think_ms,
        "requests_ok": ok,
        "errors": sum(errors.values()),
        "error_detail": errors,
        "rps": round(ok / seconds, 1),
        "latency_ms": {k: v / 1000 for k, v in w["latency_us"].items()},
    }


def streams(
    target: Target, concurrency: int, think_ms: float, duration: float, warmup: int = 3
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.stream_client",
        "--url",
        target.url,
        "--key",
        target.key,
        "--concurrency",
        str(concurrency),
        "--think-ms",
        str(think_ms),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--expect-chunks",
        str(STREAM_CONTENT_CHUNKS),
    ]
    done = subprocess.run(
        cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=duration + 120
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("STREAM_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"stream client failed ({done.returncode}): {done.stderr[-1000:]}")
    s = json.loads(line.removeprefix("STREAM_JSON "))
    s |= {
        "tool": "bench.stream_client",
        "conns": concurrency,
        "think_ms": think_ms,
        "requests_ok": s["streams_ok"],
        "errors": s["streams_failed"],
    }
    return s

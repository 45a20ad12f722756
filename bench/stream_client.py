"""Streaming load client (its own process): ``python -m bench.stream_client --url URL ...``.

``--concurrency`` workers each send a streamed chat completion (``stream: true``,
``stream_options.include_usage: true``), read the SSE events to the end, then wait a random think
time (exponential, mean ``--think-ms``) before the next one. Per stream, from the moment the
request is sent: TTFB (first ``data:`` event), TTFT (first non-empty ``delta.content``), total
(end of the stream). Every stream is checked: HTTP 200, ``--expect-chunks`` content chunks, one
usage chunk, ``[DONE]``. Prints one line ``STREAM_JSON {...}`` (times in ms). Streams still running
at the deadline are finished and counted; none is cut.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from typing import Any

import aiohttp
import orjson
import uvloop


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


async def one_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttfb = ttft = None
    chunks = 0
    usage = done = False
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            return {"ok": False, "error": f"HTTP {resp.status}: {(await resp.read())[:200]!r}"}
        async for raw in resp.content:  # one line at a time
            if not raw.startswith(b"data:"):
                continue
            now = time.perf_counter()
            ttfb = ttfb or now - t0
            data = raw[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            event = orjson.loads(data)
            usage = usage or bool(event.get("usage"))
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    ttft = ttft or now - t0
    total = time.perf_counter() - t0
    return {
        "ok": done and ttft is not None and usage,
        "ttfb": ttfb,
        "ttft": ttft,
        "total": total,
        "chunks": chunks,
        "usage": usage,
        "done": done,
    }


async def run(a: argparse.Namespace) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if a.key:
        headers["Authorization"] = "Bearer " + a.key
    body = orjson.dumps(
        {
            "model": a.model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Write a short paragraph about API gateways."},
            ],
            "max_tokens": 128,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=a.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(a.warmup):  # opens connections; not recorded
            await one_stream(session, a.url, headers, body)
        deadline = time.perf_counter() + a.duration

        async def worker(i: int) -> None:
            rnd = random.Random(i * 7919 + time.time_ns())
            await asyncio.sleep(rnd.random() * a.think_ms / 1000)
            while time.perf_counter() < deadline:
                try:
                    r = await one_stream(session, a.url, headers, body)
                except Exception as exc:
                    r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
                ok = r["ok"] and (not a.expect_chunks or r["chunks"] == a.expect_chunks)
                (results if ok else failures).append(r)
                if a.think_ms > 0:
                    await asyncio.sleep(rnd.expovariate(1000 / a.think_ms))

        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(a.concurrency)))
        elapsed = time.perf_counter() - began
    out: dict[str, Any] = {
        "streams_ok": len(results),
        "streams_failed": len(failures),
        "first_failure": failures[0] if failures else None,
        "elapsed_s": round(elapsed, 3),
        "streams_per_s": round(len(results) / elapsed, 2) if elapsed else None,
        "warmup_streams": a.warmup,
    }
    for name in ("ttfb", "ttft", "total"):
        ms = [r[name] * 1000 for r in results]
        out[name + "_ms"] = {f"p{q}": percentile(ms, q) for q in (50, 90, 99)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the full /v1/chat/completions URL")
    p.add_argument("--key", default="")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--think-ms", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--expect-chunks", type=int, default=0, help="content chunks per stream")
    a = p.parse_args()
    print("STREAM_JSON " + orjson.dumps(uvloop.run(run(a))).decode(), flush=True)


if __name__ == "__main__":
    main()

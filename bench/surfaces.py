"""What each client surface adds, measured in one run: ``python -m bench.surfaces``
(and ``make bench``'s ``surfaces`` test).

    python -m bench.surfaces [--quick] [--duration S] [--repeats N] [--only chat-limited,...]

One gateway (1 worker, embedded stores, a funded team key: every request fully metered) in
front of the fake OpenAI upstream and, in the same process, the fake Anthropic upstream. Per
repetition and surface, a direct run and a gateway run follow each other (wrk, 4 connections,
exponential think time of 50 ms, the load of ``make bench``'s latency test):

==============  ==========================================  =====================================
surface         through the gateway                         direct baseline
==============  ==========================================  =====================================
chat            ``/v1/chat/completions`` → openai            the fake's ``/v1/chat/completions``
responses       ``/v1/responses`` → openai                   the fake's ``/v1/responses``
messages        ``/v1/messages`` → anthropic (native)        the Anthropic fake's ``/v1/messages``
messages→chat   ``/v1/messages`` → openai (translated)       the fake's ``/v1/chat/completions``
chat→messages   ``/v1/chat/completions`` → anthropic         the Anthropic fake's ``/v1/messages``
chat-limited    ``/v1/chat/completions`` → openai, with a     the fake's ``/v1/chat/completions``
                second key of the same team that has
                ``rpm`` and ``tpm`` set (never reached)
==============  ==========================================  =====================================

The figure per surface is the added p50 (gateway p50 − direct p50, paired per repetition; the
median over repetitions), and its difference from chat's in the same repetition: issue 11's
target is within 0.2 ms. For ``chat-limited`` that difference is what a key's rate limits add
(the hold keeps the key's rate log, the settle corrects its tokens, the answer carries the
``x-ratelimit-*`` headers), measured on the same gateway process as chat, interleaved: issue 12's
target is at most 0.05 ms. Every gateway response must be a 200 that left one usage record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bench import load
from bench.stack import ANTHROPIC_MODEL, MODEL, FakeUpstream, Gateway, http

RESULTS = Path(__file__).resolve().parent / "results"
_CHAT_MESSAGES = cast(list[dict[str, str]], load.CHAT_BODY["messages"])
SYSTEM, QUESTION = _CHAT_MESSAGES[0]["content"], _CHAT_MESSAGES[1]["content"]
MAX_TOKENS = 128
ANTHROPIC_HEADERS = "anthropic-version: 2023-06-01"
KEY_LIMITS = {"rpm": 10**9, "tpm": 10**15}  # never reached: every request pays for the rate logs


def chat_body(model: str) -> dict[str, Any]:
    return {**load.CHAT_BODY, "model": model}


def messages_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0.2,
    }


def responses_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "instructions": SYSTEM,
        "input": QUESTION,
        "max_output_tokens": MAX_TOKENS,
    }


@dataclass(frozen=True)
class Leg:
    """One side of a pair: where the request goes and what it is."""

    base: str  # "openai", "anthropic", "gateway" or "gateway-limited" (the key with rpm and tpm)
    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Surface:
    name: str
    direct: Leg
    gateway: Leg


SURFACES = (
    Surface(
        "chat",
        Leg("openai", "/v1/chat/completions", chat_body(MODEL)),
        Leg("gateway", "/v1/chat/completions", chat_body(MODEL)),
    ),
    Surface(
        "responses",
        Leg("openai", "/v1/responses", responses_body(MODEL)),
        Leg("gateway", "/v1/responses", responses_body(MODEL)),
    ),
    Surface(
        "messages",
        Leg("anthropic", "/messages", messages_body(ANTHROPIC_MODEL)),
        Leg("gateway", "/v1/messages", messages_body(ANTHROPIC_MODEL)),
    ),
    Surface(
        "messages→chat",
        Leg("openai", "/v1/chat/completions", chat_body(MODEL)),
        Leg("gateway", "/v1/messages", messages_body(MODEL)),
    ),
    Surface(
        "chat→messages",
        Leg("anthropic", "/messages", messages_body(ANTHROPIC_MODEL)),
        Leg("gateway", "/v1/chat/completions", chat_body(ANTHROPIC_MODEL)),
    ),
    Surface(
        "chat-limited",
        Leg("openai", "/v1/chat/completions", chat_body(MODEL)),
        Leg("gateway-limited", "/v1/chat/completions", chat_body(MODEL)),
    ),
)


@dataclass
class Bench:
    fake: FakeUpstream
    gateway: Gateway
    workdir: Path
    duration: float
    conns: int = 4
    think_ms: float = 50.0

    def target(self, leg: Leg, label: str) -> tuple[load.Target, Path]:
        body = self.workdir / f"{label}.json"
        body.write_text(json.dumps(leg.body))
        if leg.base.startswith("gateway"):
            key = self.gateway.limited_key if leg.base == "gateway-limited" else self.gateway.key
            url = self.gateway.base + leg.path
            headers = ANTHROPIC_HEADERS if leg.path == "/v1/messages" else ""
        elif leg.base == "anthropic":
            url, key = self.fake.anthropic_url + leg.path, ""
            headers = ANTHROPIC_HEADERS + "|x-api-key: sk-bench-upstream"
        else:
            url, key, headers = self.fake.url + leg.path, "", ""
        return load.Target(label, url, key, headers), body

    def sanity(self, surface: Surface) -> None:
        for leg in (surface.direct, surface.gateway):
            t, _ = self.target(leg, "sanity")
            headers = dict(h.split(": ", 1) for h in t.headers.split("|") if h)
            status, body = http("POST", t.url, leg.body, t.key or None, headers)
            if status != 200:
                raise RuntimeError(f"{surface.name} via {leg.base}: HTTP {status} {body!r:.300}")

    def pair(self, surface: Surface) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for side, leg in (("direct", surface.direct), ("gateway", surface.gateway)):
            t, body = self.target(leg, f"{surface.name}-{side}".replace("→", "-"))
            time.sleep(0.5)
            out[side] = load.wrk(t, body, self.conns, self.duration, self.think_ms)
        return out


def chosen(only: str) -> tuple[Surface, ...]:
    """The surfaces named (comma-separated; chat always, first: the others are paired with it)."""
    names = {n.strip() for n in only.split(",") if n.strip()} | {"chat"}
    unknown = names - {s.name for s in SURFACES}
    if unknown:
        raise SystemExit(f"unknown surface(s): {', '.join(sorted(unknown))}")
    return tuple(s for s in SURFACES if s.name in names)


def summarize(
    runs: list[dict[str, Any]], surfaces: tuple[Surface, ...] = SURFACES
) -> dict[str, Any]:
    """Per surface: median p50s, the added p50 and its difference from chat's, both paired
    per repetition, and the error count."""
    table: dict[str, Any] = {}
    for s in surfaces:
        mine = [r for r in runs if r["surface"] == s.name]
        added = [r["gateway"]["latency_ms"]["p50"] - r["direct"]["latency_ms"]["p50"] for r in mine]
        chat = [r for r in runs if r["surface"] == "chat"]
        vs_chat = [
            a - (c["gateway"]["latency_ms"]["p50"] - c["direct"]["latency_ms"]["p50"])
            for a, c in zip(added, chat, strict=True)
        ]
        table[s.name] = {
            "direct_p50_ms": statistics.median(r["direct"]["latency_ms"]["p50"] for r in mine),
            "gateway_p50_ms": statistics.median(r["gateway"]["latency_ms"]["p50"] for r in mine),
            "added_p50_ms": round(statistics.median(added), 3),
            "added_p99_ms": round(
                statistics.median(
                    r["gateway"]["latency_ms"]["p99"] - r["direct"]["latency_ms"]["p99"]
                    for r in mine
                ),
                3,
            ),
            "vs_chat_ms": round(statistics.median(vs_chat), 3),
            "gateway_ok": sum(r["gateway"]["requests_ok"] for r in mine),
            "errors": sum(r["gateway"]["errors"] + r["direct"]["errors"] for r in mine),
        }
    return table


def markdown(table: dict[str, Any], verify: dict[str, Any]) -> str:
    lines = [
        "| surface | direct p50 | gateway p50 | added p50 | added p99 "
        "| added minus chat's | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in table.items():
        vs = "—" if name == "chat" else f"{t['vs_chat_ms']:+.3f} ms"
        lines.append(
            f"| {name} | {t['direct_p50_ms']:.3f} ms | {t['gateway_p50_ms']:.3f} ms | "
            f"{t['added_p50_ms']:+.3f} ms | {t['added_p99_ms']:+.3f} ms | {vs} | {t['errors']} |"
        )
    lines.append("")
    lines.append(
        f"Usage records: {verify['usage_records']} for {verify['gateway_ok']} gateway 200s "
        f"(+ sanity requests; wrk leaves at most {verify['margin']} in flight): "
        + ("ok" if verify["ok"] else "MISMATCH")
    )
    return "\n".join(lines) + "\n"


def verify(
    gw: Gateway, table: dict[str, Any], runs: int, conns: int, sanity: int
) -> dict[str, Any]:
    """Every gateway 200 left one usage record: the count in PostgreSQL (after the writer has
    drained) is the 200s wrk saw plus the sanity requests, plus at most one in-flight request
    per connection per run (wrk does not count those)."""
    ok = sum(t["gateway_ok"] for t in table.values()) + sanity
    margin = runs * conns
    deadline = time.monotonic() + 30
    while True:
        records = sum(gw.usage_records().values())
        if records >= ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {
        "gateway_ok": ok,
        "usage_records": records,
        "margin": margin,
        "ok": 0 <= records - ok <= margin and all(t["errors"] == 0 for t in table.values()),
    }


def run(
    workdir: Path,
    duration: float,
    repeats: int,
    log: Any = print,
    surfaces: tuple[Surface, ...] = SURFACES,
) -> dict[str, Any]:
    fake = FakeUpstream(workdir, anthropic=True)
    fake.start()
    gw = Gateway(1, fake.url, anthropic_url=fake.anthropic_url)
    try:
        gw.start()
        gw.provision(limited=KEY_LIMITS)
        bench = Bench(fake, gw, workdir, duration)
        for s in surfaces:
            bench.sanity(s)
        log(f"surfaces: sanity OK on {gw.base}; {repeats} × {len(surfaces)} pairs of {duration} s")
        runs = []
        for rep in range(1, repeats + 1):
            for s in surfaces:
                r = bench.pair(s) | {"rep": rep, "surface": s.name}
                d, g = r["direct"]["latency_ms"]["p50"], r["gateway"]["latency_ms"]["p50"]
                log(f"  rep{rep} {s.name:<14} direct {d:.3f} gateway {g:.3f} ms (+{g - d:.3f})")
                runs.append(r)
        table = summarize(runs, surfaces)
        checked = verify(gw, table, len(runs), bench.conns, len(surfaces))
    finally:
        gw.stop()
        fake.stop()
    return {"runs": runs, "table": table, "verify": checked}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.surfaces", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 repetition of 3 s runs")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 10)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--only", default="", help="these surfaces (and chat), comma-separated")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    duration = a.duration or (3 if a.quick else 10)
    repeats = a.repeats or (1 if a.quick else 3)
    load.ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="mb-surfaces-") as tmp:
        result = run(Path(tmp), duration, repeats, surfaces=chosen(a.only) if a.only else SURFACES)
    md = markdown(result["table"], result["verify"])
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (a.out / f"{stamp}-surfaces.json").write_text(json.dumps(result, indent=1))
    (a.out / f"{stamp}-surfaces.md").write_text(md)
    print("\n" + md)
    return 0 if result["verify"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

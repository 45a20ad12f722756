"""Prometheus metrics, correct across worker processes.

Uses prometheus_client's multiprocess mode: each process writes its samples to memory-mapped
files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` (in any worker) merges them. The CLI sets
that directory up before any worker starts; a single process without it gets a private one.
Metric objects live on a :class:`Metrics` instance held in the app, never in module globals.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The refusals modelbridge_limit_rejections_total counts (contract sections 4 and 10: money and
# model access); every one is shown from the start, at 0.
REJECTION_REASONS = (
    "model_not_found",
    "model_not_allowed",
    "insufficient_quota",
    "team_spending_limit_reached",
    "member_limit_reached",
    "key_limit_reached",
    "rate_limit_exceeded",
)
TOKEN_KINDS = ("prompt", "completion")
ATTEMPT_OUTCOMES = ("ok", "retried", "failed")  # policies.routing.outcome
STORES = ("redis", "postgresql")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)


def prepare_multiproc_dir(path: Path) -> None:
    """Empty (or create) the directory and point prometheus_client at it. Call before workers."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ[MULTIPROC_ENV] = str(path)


def _use_multiprocess_values() -> None:
    """Make metrics created from now on write to the shared files (prometheus_client picks its
    value class at import time; this makes the choice explicit and independent of import order)."""
    if not os.environ.get(MULTIPROC_ENV):  # no serve before us (tests, tools): a directory
        made = tempfile.mkdtemp(prefix="modelbridge-metrics-")  # of our own, gone at our exit
        os.environ[MULTIPROC_ENV] = made
        atexit.register(_remove_if_ours, made, os.getpid())
    # prometheus_client asks getpid() (a system call) on every update; a cached pid, refreshed
    # in a forked child, names the same file.
    pid = [os.getpid()]
    os.register_at_fork(after_in_child=lambda: pid.__setitem__(0, os.getpid()))
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: pid[0])


def _remove_if_ours(path: str, creator: int) -> None:
    """At exit of the process that made ``path`` (not of a forked child that inherited it)."""
    if os.getpid() == creator:
        shutil.rmtree(path, ignore_errors=True)


_PER_PROCESS: dict[int, int] = {}  # Metrics instances made so far, per process id


class Metrics:
    def __init__(self, team_labels: bool = False) -> None:
        _use_multiprocess_values()
        # The first instance of a process writes the process's files; another one (several
        # gateways in one test process) writes files of its own, so that neither overwrites the
        # other's samples of the same labels.
        pid = os.getpid()
        self._instance = _PER_PROCESS.get(pid, 0)
        _PER_PROCESS[pid] = self._instance + 1
        self._values: Any = None
        self._pending: dict[Any, float] = {}  # folded increments: value -> amount (see add)
        self._sets: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}  # children used together
        if self._instance:
            name = f"{pid}-{self._instance}"
            self._values = values.MultiProcessValue(process_identifier=lambda: name)
        with self._own_files():
            self._make(team_labels)

    @contextlib.contextmanager
    def _own_files(self) -> Iterator[None]:
        if self._values is None:
            yield
            return
        saved, values.ValueClass = values.ValueClass, self._values
        try:
            yield
        finally:
            values.ValueClass = saved

    def _make(self, team_labels: bool) -> None:
        self.team_labels = team_labels
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        team = ("team",) if team_labels else ()
        self.requests = Counter(
            "modelbridge_requests_total",
            "Proxied requests",
            ("endpoint", "model", "status", *team),
            registry=None,
        )
        self.tokens = Counter(
            "modelbridge_tokens_total", "Tokens metered", ("model", "kind", *team), registry=None
        )
        self.spend = Counter(
            "modelbridge_spend_usd_total", "USD charged", ("model", *team), registry=None
        )
        self.rejections = Counter(
            "modelbridge_limit_rejections_total",
            "Requests refused by a limit",
            ("reason",),
            registry=None,
        )
        self.duration = Histogram(
            "modelbridge_request_duration_seconds",
            "Request duration",
            ("endpoint", "model"),
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.ttfb = Histogram(
            "modelbridge_upstream_ttfb_seconds",
            "Upstream time to first byte",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=None,
        )
        self.overhead = Histogram(
            "modelbridge_gateway_overhead_seconds",
            "Time spent in the gateway, upstream excluded",
            ("endpoint",),
            buckets=_OVERHEAD_BUCKETS,
            registry=None,
        )
        self.attempts = Counter(
            "modelbridge_upstream_attempts_total",
            "Upstream attempts, one per deployment tried (retried: another attempt followed)",
            ("upstream", "outcome"),
            registry=None,
        )
        self.fallbacks = Counter(
            "modelbridge_fallbacks_total",
            "Requests that went on to a fallback model",
            ("model", "to"),
            registry=None,
        )
        self.inflight = Gauge(
            "modelbridge_inflight_requests",
            "Requests in flight",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.store_up = Gauge(
            "modelbridge_store_up",
            "1 when the store (redis, postgresql) answered this gateway at the last scrape, else 0",
            ("store",),
            multiprocess_mode="mostrecent",
            registry=None,
        )
        self.usage_pending = Gauge(
            "modelbridge_usage_events_pending",
            "Usage records accepted but not yet in PostgreSQL",
            multiprocess_mode="mostrecent",
            registry=None,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the hot path asks for the same few children."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) > 10_000:  # per-team labels: bound the cache, not the metric
                self._children.clear()
            with self._own_files():
                found = self._children[key] = metric.labels(*labels)
        return found

    # --- folded updates ----------------------------------------------------------------------
    # A metric update writes the process's file (a lock, a struct, an mmap store): about a dozen
    # per request. The hot path's updates are folded instead: summed per value in a dict and
    # written once per event-loop step (at the end of it, before any I/O of the next one), so
    # requests finishing in the same step share the writes. /metrics in this process writes them
    # first; another process sees them one loop step later at most.
    def add(self, child: Any, amount: float = 1.0) -> None:
        """``child.inc(amount)`` for a counter's child (``amount >= 0``) or a gauge (any sign)."""
        pending, value = self._pending, child._value
        if value in pending:
            pending[value] += amount
        elif pending or self._flush_soon():
            pending[value] = amount
        else:  # no loop: written at once
            value.inc(amount)

    def observe(self, child: Any, amount: float) -> None:
        """``child.observe(amount)`` for a histogram's child: its sum and its bucket."""
        pending = self._pending
        if not pending and not self._flush_soon():
            child.observe(amount)
            return
        total, bucket = child._sum, child._buckets[bisect_left(child._upper_bounds, amount)]
        pending[total] = pending.get(total, 0.0) + amount
        pending[bucket] = pending.get(bucket, 0.0) + 1.0

    def _flush_soon(self) -> bool:
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:
            return False
        return True

    def usage_children(self, model: str, team_id: str | None) -> tuple[Any, Any, Any]:
        """The prompt-token, completion-token and spend children of ``model`` (and team)."""
        key = ("usage", model, team_id if self.team_labels else None)
        found = self._sets.get(key)
        if found is None:
            team = self.team_label(team_id)
            found = (
                self.child(self.tokens, model, "prompt", *team),
                self.child(self.tokens, model, "completion", *team),
                self.child(self.spend, model, *team),
            )
            self._keep_set(key, found)
        return found

    def request_children(
        self, endpoint: str, model: str, status: int, team_id: str | None
    ) -> tuple[Any, Any, Any]:
        """The requests, duration and overhead children of a request that ended so."""
        key = (endpoint, model, status, team_id if self.team_labels else None)
        found = self._sets.get(key)
        if found is None:
            team = self.team_label(team_id)
            found = (
                self.child(self.requests, endpoint, model, str(status), *team),
                self.child(self.duration, endpoint, model),
                self.child(self.overhead, endpoint),
            )
            self._keep_set(key, found)
        return found

    def _keep_set(self, key: tuple[Any, ...], found: tuple[Any, Any, Any]) -> None:
        if len(self._sets) > 10_000:  # per-team labels: bound the cache
            self._sets.clear()
        self._sets[key] = found

    def flush(self) -> None:
        """Write the folded updates."""
        pending, self._pending = self._pending, {}
        for value, amount in pending.items():
            value.inc(amount)

    def preset(self, endpoints: list[str], models: list[str]) -> None:
        """Every family with its known label values at 0, so that a fresh gateway's /metrics
        (and a dashboard or alert reading it) shows 0, not "no data": with several processes a
        family with no sample is not shown at all. Per-team families start at their first team."""
        for reason in REJECTION_REASONS:
            self.child(self.rejections, reason)
        for store in STORES:
            self.child(self.store_up, store)
        for endpoint in endpoints:
            self.child(self.overhead, endpoint)
            for model in models:
                self.child(self.duration, endpoint, model)
                if not self.team_labels:
                    self.child(self.requests, endpoint, model, "200")
        for model in models:
            self.child(self.ttfb, model)
            if not self.team_labels:
                self.child(self.spend, model)
                for kind in TOKEN_KINDS:
                    self.child(self.tokens, model, kind)

    def preset_routing(self, upstreams: list[str], fallbacks: list[tuple[str, str]]) -> None:
        """The routing families at 0: every upstream's outcomes, every configured fallback."""
        for upstream in upstreams:
            for outcome in ATTEMPT_OUTCOMES:
                self.child(self.attempts, upstream, outcome)
        for model, to in fallbacks:
            self.child(self.fallbacks, model, to)

    def team_label(self, team_id: str | None) -> tuple[str, ...]:
        """The extra ``team`` label value when per-team labels are on ("" for personal keys)."""
        return (team_id or "",) if self.team_labels else ()

    def render(self) -> bytes:
        """The merged exposition of every process's files (what is pending written first)."""
        self.flush()
        return _merged()

    async def render_off_loop(self) -> bytes:
        """:meth:`render` with the merge in a thread: it reads and parses every process's files
        (with per-team labels and workers that came and went, hundreds of milliseconds), which on
        the event loop would stall every request in flight for as long."""
        self.flush()  # the folded updates belong to the loop's thread
        return await asyncio.to_thread(_merged)


def _merged() -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def mark_worker_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)

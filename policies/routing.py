"""Routing decisions (contract section 9, "Routing"): which deployment serves an attempt, which
failures are worth another attempt, when a deployment cools down, and the order of the chain.

A model lists one or more deployments (an upstream and the model name there, with a weight) and
may name fallback models. A client request is tried on the model's deployments, each at most once
and at most ``1 + retries`` of them, then on each fallback model the same way, in order, for as
long as nothing of the answer has reached the client. A deployment that failed ``cooldown_after``
times within :data:`COOLDOWN_WINDOW_S` seconds is skipped for ``cooldown_s`` seconds (on that
process), unless every deployment of the model is cooling down.

Pure code: time is an argument, the random draw too (a float in [0, 1)).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

COOLDOWN_WINDOW_S = 60.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
DEFAULT_RETRIES = 2
DEFAULT_COOLDOWN_AFTER = 3
DEFAULT_COOLDOWN_S = 30.0


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place a model is served: ``upstream`` (a configured upstream's name), the model's name
    there, and its share of the traffic (relative to the model's other deployments)."""

    upstream: str
    upstream_model: str
    weight: float = 1.0

    @property
    def label(self) -> str:
        """``<upstream>/<upstream_model>``: the ``x-modelbridge-served-by`` header's value."""
        return f"{self.upstream}/{self.upstream_model}"


class Failure(enum.Enum):
    """How an attempt failed before anything reached the client."""

    CONNECT = "connect"  # no connection, or the connection broke before an answer
    TIMEOUT = "timeout"  # no first byte in time
    STATUS = "status"  # the provider answered an error status
    MALFORMED = "malformed"  # a 200 that is not what the protocol promises


class Verdict(enum.Enum):
    RETRY = "retry"  # try the next deployment of the chain
    RETURN = "return"  # give this failure to the client as it is


def classify(failure: Failure, status: int | None = None) -> Verdict:
    """Connect errors, timeouts and 429/500/502/503/504/529 are retried; any other error status
    (400, 401, 403, 404, 422...) and a malformed answer go back to the client at once."""
    if failure in (Failure.CONNECT, Failure.TIMEOUT):
        return Verdict.RETRY
    if failure is Failure.STATUS and status in RETRY_STATUSES:
        return Verdict.RETRY
    return Verdict.RETURN


def weighted(weights: Sequence[float], candidates: Sequence[int], draw: float) -> int:
    """The candidate index chosen by ``draw`` (in [0, 1)) in proportion to its weight."""
    total = sum(weights[i] for i in candidates)
    point = min(max(draw, 0.0), 1.0) * total
    for i in candidates:
        point -= weights[i]
        if point < 0:
            return i
    return candidates[-1]


def candidates(count: int, tried: Collection[int], cooling: Collection[int]) -> list[int]:
    """The deployments (indices) the next attempt may pick: those not tried in this request and
    not cooling down; when every untried one is cooling down and so is every deployment, the
    untried ones anyway (a cooldown never leaves a model with nothing to try)."""
    fresh = [i for i in range(count) if i not in tried]
    warm = [i for i in fresh if i not in cooling]
    if warm:
        return warm
    if all(i in cooling for i in range(count)):
        return fresh
    return []


def pick(
    weights: Sequence[float], tried: Collection[int], cooling: Collection[int], draw: float
) -> int | None:
    """The deployment for the next attempt of one model, or None when the model is done."""
    pool = candidates(len(weights), tried, cooling)
    return weighted(weights, pool, draw) if pool else None


def attempts_allowed(retries: int, deployments: int) -> int:
    """Attempts one model gets in one request: its first plus ``retries``, each on another of
    its deployments (a single deployment is tried once)."""
    return max(1, min(1 + max(0, retries), deployments))


@dataclass
class Cooldowns:
    """One process's record of failing deployments (keyed by :attr:`Deployment.label`)."""

    failures: dict[str, deque[float]] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    def failed(self, label: str, now: float, after: int, cooldown_s: float) -> bool:
        """Note a failure at ``now``; True when it starts a cooldown."""
        seen = self.failures.setdefault(label, deque())
        seen.append(now)
        while seen and seen[0] <= now - COOLDOWN_WINDOW_S:
            seen.popleft()
        if len(seen) >= max(1, after):
            seen.clear()
            self.until[label] = now + cooldown_s
            return True
        return False

    def cooling(self, label: str, now: float) -> bool:
        until = self.until.get(label)
        if until is None:
            return False
        if now >= until:
            del self.until[label]
            return False
        return True


def chain(model: str, fallbacks: Mapping[str, Sequence[str]]) -> list[str]:
    """The models a request for ``model`` may be served by, in order: the model, then each of its
    fallbacks followed by that one's own fallbacks (depth first), each model once."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        order.append(name)
        for nxt in fallbacks.get(name, ()):
            visit(nxt)

    visit(model)
    return order


def find_cycle(fallbacks: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A fallback cycle (``[a, b, a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        if state.get(name) == 1:
            return [*path[path.index(name) :], name]
        if state.get(name) == 2:
            return None
        state[name] = 1
        for nxt in fallbacks.get(name, ()):
            found = visit(nxt, [*path, name])
            if found:
                return found
        state[name] = 2
        return None

    for name in fallbacks:
        found = visit(name, [])
        if found:
            return found
    return None


def longest_wait_s(stages: Iterable[tuple[int, Sequence[float]]]) -> float:
    """The longest a request may wait on providers along its chain, given per model its
    ``retries`` and its deployments' timeouts: its slowest deployments, as many as it gets
    attempts (a hold must outlive the failing attempts before the answer)."""
    total = 0.0
    for retries, timeouts in stages:
        slowest = sorted(timeouts, reverse=True)
        total += sum(slowest[: attempts_allowed(retries, len(slowest))])
    return total


def hold_cost(worst_costs: Iterable[int]) -> int:
    """The hold's list cost for a chain: the worst case of its dearest model."""
    return max(worst_costs, default=0)


def outcome(failed: bool, last: bool) -> str:
    """An attempt's ``outcome`` label: ``ok``; ``retried`` (failed, another followed); ``failed``
    (failed and was the last)."""
    if not failed:
        return "ok"
    return "failed" if last else "retried"

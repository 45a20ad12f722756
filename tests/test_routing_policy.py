"""Routing as tables (policies/routing.py) and its configuration (models' deployments, retries,
fallbacks, cooldowns in gateway/config.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from policies.routing import (
    Cooldowns,
    Deployment,
    Failure,
    Verdict,
    attempts_allowed,
    candidates,
    chain,
    classify,
    find_cycle,
    hold_cost,
    longest_wait_s,
    outcome,
    pick,
    weighted,
)

R, B = Verdict.RETRY, Verdict.RETURN


@pytest.mark.parametrize(
    ("failure", "status", "verdict"),
    [
        (Failure.CONNECT, None, R),
        (Failure.TIMEOUT, None, R),
        *[(Failure.STATUS, s, R) for s in (429, 500, 502, 503, 504, 529)],
        *[(Failure.STATUS, s, B) for s in (400, 401, 403, 404, 422, 409, 413, 501, 520, 524)],
        (Failure.MALFORMED, None, B),
        (Failure.MALFORMED, 502, B),
    ],
)
def test_classify(failure: Failure, status: int | None, verdict: Verdict) -> None:
    assert classify(failure, status) is verdict


@pytest.mark.parametrize(
    ("weights", "pool", "draw", "index"),
    [
        ([1, 1], [0, 1], 0.0, 0),
        ([1, 1], [0, 1], 0.49, 0),
        ([1, 1], [0, 1], 0.5, 1),
        ([1, 1], [0, 1], 0.999, 1),
        ([3, 1], [0, 1], 0.74, 0),
        ([3, 1], [0, 1], 0.75, 1),
        ([3, 1, 6], [1, 2], 0.1, 1),  # among the candidates only: 1 of 7, then 6 of 7
        ([3, 1, 6], [1, 2], 0.2, 2),
        ([0.5, 0.25], [0, 1], 0.7, 1),
        ([1], [0], 1.0, 0),  # a draw of 1.0 (never random()'s) stays in range
    ],
)
def test_weighted(weights: list[float], pool: list[int], draw: float, index: int) -> None:
    assert weighted(weights, pool, draw) == index


def test_weighted_shares_follow_the_weights() -> None:
    draws = [i / 1000 for i in range(1000)]
    picks = [weighted([3, 1], [0, 1], d) for d in draws]
    assert (picks.count(0), picks.count(1)) == (750, 250)


@pytest.mark.parametrize(
    ("count", "tried", "cooling", "pool"),
    [
        (3, set(), set(), [0, 1, 2]),
        (3, {0}, set(), [1, 2]),
        (3, set(), {1}, [0, 2]),  # a cooling deployment is skipped
        (3, {0}, {1}, [2]),
        (3, {0, 2}, {1}, []),  # the only one left is cooling, the tried one is not: done
        (2, set(), {0, 1}, [0, 1]),  # every deployment cooling: they are used anyway
        (2, {0}, {0, 1}, [1]),
        (3, {0, 1, 2}, set(), []),  # each tried once: the model is done
        (1, set(), {0}, [0]),  # a single deployment is never left out
    ],
)
def test_candidates(count: int, tried: set[int], cooling: set[int], pool: list[int]) -> None:
    assert candidates(count, tried, cooling) == pool


def test_pick() -> None:
    assert pick([1, 1, 2], {0}, set(), 0.0) == 1
    assert pick([1, 1, 2], {0}, set(), 0.5) == 2
    assert pick([1, 1], {0, 1}, set(), 0.5) is None


@pytest.mark.parametrize(
    ("retries", "deployments", "attempts"),
    [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 5, 3), (0, 3, 1), (1, 3, 2), (-1, 2, 1)],
)
def test_attempts_allowed(retries: int, deployments: int, attempts: int) -> None:
    assert attempts_allowed(retries, deployments) == attempts


def test_cooldown_after_three_failures_within_the_window() -> None:
    book = Cooldowns()
    assert not book.failed("a/m", 100.0, 3, 30)
    assert not book.failed("a/m", 110.0, 3, 30)
    assert not book.cooling("a/m", 110.0)
    assert book.failed("a/m", 159.9, 3, 30)  # the third within 60 s
    assert book.cooling("a/m", 159.9) and book.cooling("a/m", 189.8)
    assert not book.cooling("a/m", 189.9)  # 30 s later it is back
    assert not book.cooling("b/m", 159.9)  # per deployment


def test_failures_older_than_the_window_do_not_count() -> None:
    book = Cooldowns()
    book.failed("a/m", 0.0, 3, 30)
    book.failed("a/m", 30.0, 3, 30)
    assert not book.failed("a/m", 60.0, 3, 30)  # the one at 0 s is out of the window
    assert book.failed("a/m", 61.0, 3, 30)
    assert book.cooling("a/m", 61.0)


def test_cooldown_after_one() -> None:
    book = Cooldowns()
    assert book.failed("a/m", 5.0, 1, 0.5)
    assert book.cooling("a/m", 5.4) and not book.cooling("a/m", 5.5)


@pytest.mark.parametrize(
    ("fallbacks", "order"),
    [
        ({}, ["a"]),
        ({"a": ["b", "c"]}, ["a", "b", "c"]),
        ({"a": ["b", "c"], "b": ["d"]}, ["a", "b", "d", "c"]),
        ({"a": ["b", "c"], "b": ["c"]}, ["a", "b", "c"]),  # each model once
    ],
)
def test_chain(fallbacks: dict[str, list[str]], order: list[str]) -> None:
    assert chain("a", fallbacks) == order


@pytest.mark.parametrize(
    ("fallbacks", "cycle"),
    [
        ({"a": ["b"], "b": ["c"]}, None),
        ({"a": ["a"]}, ["a", "a"]),
        ({"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
        ({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),
        ({"a": ["b", "c"], "b": ["c"]}, None),  # a diamond is no cycle
    ],
)
def test_find_cycle(fallbacks: dict[str, list[str]], cycle: list[str] | None) -> None:
    assert find_cycle(fallbacks) == cycle


def test_hold_cost_and_outcome() -> None:
    assert hold_cost([5, 30, 7]) == 30
    assert hold_cost([]) == 0
    assert [outcome(False, True), outcome(True, False), outcome(True, True)] == [
        "ok",
        "retried",
        "failed",
    ]
    assert Deployment("oai", "gpt-4o").label == "oai/gpt-4o"


# --- configuration ---------------------------------------------------------------------------

UPSTREAMS = {
    "a": {"base_url": "http://a.local/v1"},
    "b": {"base_url": "http://b.local/v1"},
}
PRICES = {"input_per_mtok": 1, "output_per_mtok": 2}


def config(**models: dict[str, Any]) -> Any:
    return parse_config({"upstreams": UPSTREAMS, "models": models}, {})


def test_deployments_with_weights_fallbacks_and_defaults() -> None:
    cfg = config(
        big={
            "deployments": [
                {"upstream": "a", "upstream_model": "big-1", "weight": 3},
                {"upstream": "b", "weight": 1},
            ],
            "fallbacks": ["small"],
            **PRICES,
        },
        small={"upstream": "b", "upstream_model": "small-1", "retries": 0, **PRICES},
    )
    big, small = cfg.models["big"], cfg.models["small"]
    assert big.deployments == (Deployment("a", "big-1", 3.0), Deployment("b", "big", 1.0))
    assert (big.upstream, big.upstream_model) == ("a", "big-1")  # the first deployment's
    assert (big.retries, big.fallbacks, big.cooldown_after, big.cooldown_s) == (
        2,
        ("small",),
        3,
        30.0,
    )
    assert small.deployments == (Deployment("b", "small-1", 1.0),)  # the single form
    assert (small.retries, small.fallbacks) == (0, ())


def test_routing_keys_from_the_environment() -> None:
    raw = {
        "upstreams": UPSTREAMS,
        "models": {"m": {"upstream": "a", **PRICES}, "n": {"upstream": "b", **PRICES}},
    }
    env = {"MODELBRIDGE_MODELS_M_FALLBACKS": "n", "MODELBRIDGE_MODELS_M_RETRIES": "1"}
    m = parse_config(raw, env).models["m"]
    assert (m.fallbacks, m.retries) == (("n",), 1)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"deployments": [{"upstream": "zz"}]}, "models.m.deployments[0].upstream: no upstream"),
        ({"upstream": "zz"}, "models.m.upstream: no upstream named 'zz'"),
        ({"deployments": []}, "models.m.deployments must be a non-empty list"),
        ({"deployments": "a"}, "models.m.deployments must be a non-empty list"),
        ({"deployments": ["a"]}, "models.m.deployments[0] must be a mapping"),
        ({"deployments": [{"upstream": "a", "weight": 0}]}, "weight must be a number above 0"),
        ({"deployments": [{"upstream": "a", "weight": -1}]}, "weight must be a number above 0"),
        ({"deployments": [{"upstream": "a", "weight": "x"}]}, "weight: expected a number"),
        ({"deployments": [{"upstream": "a", "region": "x"}]}, "unknown keys in models.m.deploy"),
        ({"deployments": [{"upstream": "a"}, {"upstream": "a"}]}, "a/m is listed twice"),
        ({"upstream": "a", "deployments": [{"upstream": "a"}]}, "either deployments or upstream"),
        ({"upstream": "a", "fallbacks": ["nope"]}, "models.m.fallbacks: no model named 'nope'"),
        ({"upstream": "a", "fallbacks": ["m"]}, "models: fallback cycle m -> m"),
        ({"upstream": "a", "fallbacks": {"x": 1}}, "models.m.fallbacks must be a list"),
        ({"upstream": "a", "retries": -1}, "models.m.retries must not be negative"),
        ({"upstream": "a", "retries": "two"}, "models.m.retries: expected a number"),
        ({"upstream": "a", "cooldown_after": 0}, "models.m.cooldown_after must be at least 1"),
        ({"upstream": "a", "cooldown_s": -5}, "models.m.cooldown_s must not be negative"),
    ],
)
def test_bad_routing_config_is_one_clear_error(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(m={**model, **PRICES})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_fallback_cycle_through_two_models() -> None:
    with pytest.raises(ConfigError, match=r"fallback cycle m -> n -> m"):
        config(
            m={"upstream": "a", "fallbacks": ["n"], **PRICES},
            n={"upstream": "b", "fallbacks": ["m"], **PRICES},
        )


@pytest.mark.parametrize(
    ("stages", "wait"),
    [
        ([(2, [600.0])], 600.0),  # one deployment: one attempt
        ([(2, [10.0, 30.0, 20.0, 5.0])], 60.0),  # three attempts: the three slowest
        ([(0, [10.0, 30.0])], 30.0),
        ([(1, [10.0, 30.0]), (2, [3.0])], 43.0),  # then the fallback
    ],
)
def test_longest_wait(stages: list[tuple[int, list[float]]], wait: float) -> None:
    assert longest_wait_s(stages) == wait

"""Routing at run time (contract section 9): which deployment each attempt of a request goes to.

A :class:`Router` per process holds the plans (per requested model and client surface: the chain
of models, each with the deployments whose protocol serves that surface) and the process's
cooldowns (:class:`policies.routing.Cooldowns`). A request carries its :class:`Route`: the
:class:`Target` being tried, what was tried already, and how many attempts were made. The
decisions themselves (pick, classify, cool down, chain) are pure code in :mod:`policies.routing`;
the loops that retry live with the upstream calls in :mod:`gateway.proxy.forwarding`.

A target's ``model`` is the requested model as the proxy sees it during that attempt: the
requested name (usage records, metrics and the client see it), the prices, encoding and output
cap of the model that serves, and the deployment's upstream and upstream model name.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import state as S
from gateway.config import Config, ModelConfig
from gateway.errors import InvalidRequest
from gateway.metering.meter import guarded
from gateway.proxy.exchange import EXCHANGES, Exchange
from gateway.upstream.provider import Provider
from policies import keyspace as rk
from policies import routing as rp
from policies.limits import parse_key_entry

if TYPE_CHECKING:
    from gateway.infra.metrics import Metrics
    from gateway.proxy.handlers import Call

SERVED_BY_HEADER = "x-modelbridge-served-by"


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment of one model of a chain, as an attempt calls it."""

    model: ModelConfig  # see the module docstring
    served: ModelConfig  # the model that serves, as configured
    deployment: rp.Deployment
    exchange: Exchange
    served_by: str  # the x-modelbridge-served-by value


@dataclass(frozen=True, slots=True)
class Stage:
    """One model of a chain: its targets for the surface, their weights, its attempts."""

    model: ModelConfig
    targets: tuple[Target, ...]
    weights: tuple[float, ...]
    attempts: int


@dataclass(frozen=True, slots=True)
class Plan:
    stages: tuple[Stage, ...]  # the requested model first, then its fallbacks in order
    models: tuple[ModelConfig, ...]  # the stages' models: the hold covers the dearest
    image_tokens: int  # what the hold counts an image at: the most any of the models bills


@dataclass(slots=True)
class Route:
    """One request's way through its plan."""

    plan: Plan
    target: Target
    stage: int = 0
    tried: set[int] = field(default_factory=set)  # indices in the current stage
    attempts: int = 1
    allowed: frozenset[str] | None = None  # fallback models the key may use (read once)


class Router:
    def __init__(
        self,
        config: Config,
        providers: Mapping[str, Provider],
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.draw = draw  # the random source of weighted picks (tests pin it)
        self.cooldowns = rp.Cooldowns()
        self._protocols = {name: p.protocol for name, p in providers.items()}
        self._plans: dict[tuple[str, str], Plan | None] = {}

    # --- plans ---------------------------------------------------------------------------------
    def plan(self, model: ModelConfig, surface: str) -> Plan:
        key = (model.name, surface)
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plans[key] = self._make_plan(model, surface)
        if plan is None:
            raise InvalidRequest(
                "This endpoint is not available for this model's provider.",
                code="unsupported_endpoint",
                param="model",
            )
        return plan

    def _make_plan(self, model: ModelConfig, surface: str) -> Plan | None:
        fallbacks = {m.name: m.fallbacks for m in self.config.models.values()}
        names = rp.chain(model.name, fallbacks)
        models = tuple(self.config.models[n] for n in names)
        stages = []
        for served in models:
            stage = self._stage(model.name, served, surface)
            if stage is not None:
                stages.append(stage)
            elif served is model:
                return None  # the requested model itself cannot serve this surface
        # the hold covers the models that can serve this surface, not one skipped here
        kept = tuple(stage.model for stage in stages)
        return Plan(tuple(stages), kept, max(m.image_tokens for m in kept))

    def _stage(self, requested: str, served: ModelConfig, surface: str) -> Stage | None:
        targets = []
        for deployment in served.deployments:
            exchange = EXCHANGES.get((surface, self._protocols[deployment.upstream]))
            if exchange is None:
                continue  # e.g. the Responses API on an anthropic deployment
            view = dataclasses.replace(
                served,
                name=requested,
                upstream=deployment.upstream,
                upstream_model=deployment.upstream_model,
            )
            targets.append(Target(view, served, deployment, exchange, deployment.label))
        if not targets:
            return None
        weights = tuple(t.deployment.weight for t in targets)
        return Stage(
            served, tuple(targets), weights, rp.attempts_allowed(served.retries, len(targets))
        )

    # --- a request's route ---------------------------------------------------------------------
    def route(self, plan: Plan, now: float) -> Route:
        """The route of a new request, at its first target."""
        stage = plan.stages[0]
        if len(stage.targets) == 1:
            return Route(plan, stage.targets[0], tried={0})
        index = rp.pick(stage.weights, (), self._cooling(stage, now), self.draw())
        assert index is not None  # a fresh stage always has a candidate
        return Route(plan, stage.targets[index], tried={index})

    def _cooling(self, stage: Stage, now: float) -> set[int]:
        cooling = self.cooldowns.cooling
        return {i for i, t in enumerate(stage.targets) if cooling(t.served_by, now)}

    def failed(self, target: Target, now: float) -> None:
        """Note that ``target`` failed in a way worth a retry (it may cool down)."""
        served = target.served
        self.cooldowns.failed(target.served_by, now, served.cooldown_after, served.cooldown_s)

    def advance(self, route: Route, now: float) -> Target | None:
        """The next target after a failure: another deployment of the current model while it
        has attempts left, else the next model of the chain; None when the chain is done. The
        caller counts the attempt (``route.attempts``) once it makes it."""
        stages = route.plan.stages
        stage = stages[route.stage]
        while True:
            if len(route.tried) < stage.attempts:
                index = rp.pick(stage.weights, route.tried, self._cooling(stage, now), self.draw())
                if index is not None:
                    route.tried.add(index)
                    route.target = stage.targets[index]
                    return route.target
            if route.stage + 1 >= len(stages):
                return None
            route.stage += 1
            route.tried = set()
            stage = stages[route.stage]

    @staticmethod
    def pin(route: Route, served_by: str) -> Target | None:
        """Start ``route`` at the deployment named ``served_by`` (``<upstream>/<model>``), in
        whichever model of the chain has it: a request continuing a response that deployment
        stored. None (the route unchanged) when the chain has no such deployment any more."""
        for number, stage in enumerate(route.plan.stages):
            for index, target in enumerate(stage.targets):
                if target.served_by == served_by:
                    route.stage, route.tried, route.target = number, {index}, target
                    return target
        return None

    @staticmethod
    def skip_stage(route: Route) -> None:
        """Leave the current model (a fallback the key may not use) for the next one."""
        route.tried = set(range(len(route.plan.stages[route.stage].targets)))


async def allowed_models(call: Call) -> frozenset[str]:
    """The models of the chain this key may use: the account's blocked models and the key's own
    ``models`` read once (one pipelined round trip), when a fallback is first needed."""
    assert call.route is not None
    if call.route.allowed is None:
        key = call.key
        ak = rk.AccountKeys(key.account)
        pipe = call.app[S.REDIS].pipeline(transaction=False)
        pipe.hget(ak.keys, key.key_id)
        pipe.smembers(ak.blocked(key.blocked_scope))
        entry, blocked = await guarded(pipe.execute())
        names = {m.name for m in call.route.plan.models} - set(blocked or ())
        if entry is None:
            names = set()
        else:
            _, controls = parse_key_entry(entry)
            if controls.models is not None:
                names &= set(controls.models)
        call.route.allowed = frozenset(names)
    return call.route.allowed


def count_attempt(metrics: Metrics, target: Target, failed: bool, last: bool) -> None:
    upstream = target.deployment.upstream
    metrics.add(metrics.child(metrics.attempts, upstream, rp.outcome(failed, last)))


def count_fallback(metrics: Metrics, requested: str, target: Target) -> None:
    metrics.child(metrics.fallbacks, requested, target.served.name).inc()

"""Configuration: ``config.yaml`` parsed once, at start, into frozen dataclasses.

Every scalar of a section can be overridden from the environment as
``MODELBRIDGE_<SECTION>_<KEY>`` (``MODELBRIDGE_SERVER_PORT=9000``); entries of the map sections
as ``MODELBRIDGE_<SECTION>_<NAME>_<KEY>`` (``MODELBRIDGE_UPSTREAMS_OPENAI_BASE_URL``). Secrets
never live in the file: an upstream names the env var that holds its key (``api_key_env``).
Unknown keys stop the start with an error naming them; so does a price that is not a whole
number of nano-dollars per token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway import configfile
from policies import forwarded, images
from policies import keyspace as rk
from policies.money import MoneyError, parse_usd, price_per_token
from policies.pricing import Prices
from policies.routing import (
    DEFAULT_COOLDOWN_AFTER,
    DEFAULT_COOLDOWN_S,
    DEFAULT_RETRIES,
    Deployment,
    find_cycle,
)

ENV_PREFIX = "MODELBRIDGE_"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    public_url: str = ""
    shutdown_timeout_s: float = 30.0
    # A request partly received, and nothing more of it for this long: 408, connection closed.
    request_read_timeout_s: float = 60.0
    session_ttl_s: int = 30 * 24 * 3600
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For names the client.
    trusted_proxies: tuple[str, ...] = ()
    signups_per_hour: int = 20  # per client address; 0: no limit


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    api_key_env: str = ""
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    kind: str = "openai"  # openai | anthropic | azure: see gateway.upstream.kinds
    api_version: str = ""  # azure: the api-version query parameter
    max_response_bytes: int = 64 * 1024 * 1024  # a bigger plain answer is a 502 upstream_error

    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    upstream: str  # the first deployment's (the only one in the single form)
    upstream_model: str
    prices: Prices
    max_output_tokens: int
    encoding: str = "cl100k_base"
    # Routing (contract section 9): where the model is served, and what follows a failure.
    deployments: tuple[Deployment, ...] = ()
    retries: int = DEFAULT_RETRIES
    fallbacks: tuple[str, ...] = ()
    cooldown_after: int = DEFAULT_COOLDOWN_AFTER
    cooldown_s: float = DEFAULT_COOLDOWN_S
    # What the hold counts one image part at (policies/images.py): the most an image can cost.
    image_tokens: int = images.DEFAULT


@dataclass(frozen=True)
class PlanConfig:
    name: str
    seat_price: int  # nano-dollars
    included_usage_per_seat: int


@dataclass(frozen=True)
class SmtpConfig:
    host: str = ""
    port: int = 25
    from_addr: str = "ModelBridge <noreply@example.com>"
    username_env: str = ""
    password_env: str = ""
    starttls: bool = False
    timeout_s: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    team_labels: bool = False
    token_env: str = ""

    def token(self) -> str:
        return os.environ.get(self.token_env, "") if self.token_env else ""


@dataclass(frozen=True)
class MeteringConfig:
    hold_margin_s: int = 60  # a hold lives the longest routing chain's timeouts plus this
    journal_max: int = 100_000  # settles kept per process while Redis does not take them
    sweep_every_s: float = 5.0  # expired holds are cleared this often, with no request needed
    writer_batch: int = 2000  # usage records read and inserted per step of the writer
    claim_idle_s: float = 30.0  # a dead writer's unwritten records are taken over after this
    # a stored Responses API response's note (its history size, its deployment) lives this
    # long: 30 days, as OpenAI keeps the response; 0 keeps none
    response_notes_s: int = rk.RESPONSE_NOTE_TTL_S


@dataclass(frozen=True)
class RedisConfig:
    """How the gateway uses Redis (its URL is ``MODELBRIDGE_REDIS_URL``, a secret)."""

    script_client: str = "lean"  # or "redis-py": the hot path's scripts through redis-py
    wait_replicas: int = 0  # >0: every metering write waits for that many replicas (WAIT)
    wait_timeout_ms: int = 100  # how long a WAIT may take before the write counts as unconfirmed


@dataclass(frozen=True)
class InvitationsConfig:
    expires_in_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class AlertsConfig:
    # Webhooks may reach loopback, private, link-local and metadata addresses (a test receiver,
    # an intranet): off by default, as a team admin could otherwise aim the gateway inside.
    allow_private_urls: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    plans: Mapping[str, PlanConfig] = field(default_factory=dict)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    invitations: InvitationsConfig = field(default_factory=InvitationsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)

    @property
    def public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        return f"http://{self.server.host}:{self.server.port}"


_SCALAR_SECTIONS: dict[str, tuple[type, dict[str, str]]] = {
    "server": (ServerConfig, {}),
    "smtp": (SmtpConfig, {"from": "from_addr"}),
    "metrics": (MetricsConfig, {"token": "token_env"}),
    "invitations": (InvitationsConfig, {}),
    "alerts": (AlertsConfig, {}),
    "metering": (MeteringConfig, {}),
    "redis": (RedisConfig, {}),
}
_TOP_KEYS = {*_SCALAR_SECTIONS, "upstreams", "models", "plans"}


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or ``config.yaml`` in the working directory), apply env overrides."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    cfg_path = Path(path) if path else Path("config.yaml")
    text = ""
    if cfg_path.exists():
        try:
            text = cfg_path.read_text()
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(configfile.yaml_problem(cfg_path, exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{cfg_path}: cannot read it: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{cfg_path}: the top level must be a mapping")
        raw = loaded
    elif path:
        raise ConfigError(f"config file not found: {cfg_path}")
    try:
        return parse_config(raw, env)
    except ConfigError as exc:
        if not text:
            raise
        raise ConfigError(configfile.located(cfg_path, text, str(exc))) from None


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    sections: dict[str, Any] = {}
    for name, (cls, renames) in _SCALAR_SECTIONS.items():
        section = _mapping(raw.get(name), name)
        sections[name] = _build(cls, _with_env(section, name, cls, renames, env), name, renames)
    upstreams = {
        name: _build(
            UpstreamConfig,
            {**_with_env(v, f"upstreams_{name}", UpstreamConfig, {}, env), "name": name},
            f"upstreams.{name}",
            {},
        )
        for name, v in _mapping(raw.get("upstreams"), "upstreams").items()
    }
    models = {
        name: _model(name, _with_env(v, f"models_{name}", None, {}, env, _MODEL_KEYS), upstreams)
        for name, v in _mapping(raw.get("models"), "models").items()
    }
    _check_fallbacks(models)
    plans = {name: _plan(name, v) for name, v in _mapping(raw.get("plans"), "plans").items()}
    for up in upstreams.values():
        _check_kind(up)
    config = Config(upstreams=upstreams, models=models, plans=plans, **sections)
    if config.server.workers < 1:
        raise ConfigError("server.workers must be at least 1")
    if config.redis.script_client not in ("lean", "redis-py"):
        raise ConfigError("redis.script_client must be lean or redis-py")
    if config.redis.wait_replicas < 0 or config.redis.wait_timeout_ms < 1:
        raise ConfigError("redis.wait_replicas must be >= 0 and redis.wait_timeout_ms >= 1")
    if config.server.max_body_bytes < 1024:
        raise ConfigError("server.max_body_bytes must be at least 1024")
    if not config.server.request_read_timeout_s > 0:
        raise ConfigError("server.request_read_timeout_s must be above 0")
    if not 0 <= config.server.port <= 65535:
        raise ConfigError("server.port must be from 0 to 65535 (0: a free port)")
    if config.server.signups_per_hour < 0:
        raise ConfigError("server.signups_per_hour must not be negative")
    try:
        forwarded.networks(config.server.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"server.trusted_proxies: {exc}") from exc
    return config


def _fields(cls: type) -> dict[str, Any]:
    return dict(getattr(cls, "__dataclass_fields__"))  # noqa: B009


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping")
    return {str(k): v for k, v in value.items()}


def _env_name(section: str, key: str) -> str:
    return (ENV_PREFIX + section + "_" + key).upper().replace("-", "_").replace(".", "_")


def _with_env(
    section: Any,
    prefix: str,
    cls: type | None,
    renames: dict[str, str],
    env: Mapping[str, str],
    known: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    values = _mapping(section, prefix)
    names = set(values) | known
    if cls is not None:
        inverse = {v: k for k, v in renames.items()}
        names |= {inverse.get(f, f) for f in _fields(cls) if f != "name"}
    for key in names:
        override = env.get(_env_name(prefix, key))
        if override is not None:
            values[key] = override
    return values


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ConfigError(f"{where}: expected true or false")
        return bool(value)
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(str(item).strip() for item in items if str(item).strip())
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    return "" if value is None else str(value)


def _build(cls: type, values: dict[str, Any], where: str, renames: dict[str, str]) -> Any:
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        attr = renames.get(key, key)
        if attr not in fields:
            unknown.append(key)
            continue
        default = fields[attr].default
        kwargs[attr] = value if attr == "name" else _coerce(value, default, f"{where}.{key}")
    if unknown:
        raise ConfigError(f"unknown keys in {where}: {', '.join(sorted(unknown))}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


_MODEL_KEYS = frozenset({
    "upstream", "upstream_model", "input_per_mtok", "output_per_mtok", "cached_input_per_mtok",
    "cache_write_per_mtok", "max_output_tokens", "encoding", "deployments", "retries",
    "fallbacks", "cooldown_after", "cooldown_s", "image_tokens",
})  # fmt: skip
_DEPLOYMENT_KEYS = frozenset({"upstream", "upstream_model", "weight"})


def _model(name: str, raw: dict[str, Any], upstreams: Mapping[str, UpstreamConfig]) -> ModelConfig:
    where = f"models.{name}"
    unknown = sorted(set(raw) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown keys in {where}: {', '.join(unknown)}")
    deployments = _deployments(name, raw, upstreams)
    try:
        cached = raw.get("cached_input_per_mtok")
        writes = raw.get("cache_write_per_mtok")
        prices = Prices(
            input=price_per_token(raw.get("input_per_mtok", 0)),
            output=price_per_token(raw.get("output_per_mtok", 0)),
            cached_input=None if cached is None else price_per_token(cached),
            cache_write=None if writes is None else price_per_token(writes),
        )
    except MoneyError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    max_out = _coerce(raw.get("max_output_tokens", 4096), 0, f"{where}.max_output_tokens")
    if max_out < 0:
        raise ConfigError(f"{where}.max_output_tokens must not be negative")
    retries = _coerce(raw.get("retries", DEFAULT_RETRIES), 0, f"{where}.retries")
    after = _coerce(raw.get("cooldown_after", DEFAULT_COOLDOWN_AFTER), 0, f"{where}.cooldown_after")
    cooldown_s = _coerce(raw.get("cooldown_s", DEFAULT_COOLDOWN_S), 0.0, f"{where}.cooldown_s")
    if retries < 0:
        raise ConfigError(f"{where}.retries must not be negative")
    if after < 1:
        raise ConfigError(f"{where}.cooldown_after must be at least 1")
    if cooldown_s < 0:
        raise ConfigError(f"{where}.cooldown_s must not be negative")
    image_tokens = _coerce(
        raw.get("image_tokens", images.model_image_tokens(d.upstream_model for d in deployments)),
        0,
        f"{where}.image_tokens",
    )
    if image_tokens < 0:
        raise ConfigError(f"{where}.image_tokens must not be negative")
    fallbacks = raw.get("fallbacks") or []
    if not isinstance(fallbacks, list | tuple | str):
        raise ConfigError(f"{where}.fallbacks must be a list of model names")
    return ModelConfig(
        name=name,
        upstream=deployments[0].upstream,
        upstream_model=deployments[0].upstream_model,
        prices=prices,
        max_output_tokens=max_out,
        encoding=str(raw.get("encoding") or "cl100k_base"),
        deployments=deployments,
        retries=retries,
        fallbacks=_coerce(fallbacks, (), f"{where}.fallbacks"),
        cooldown_after=after,
        cooldown_s=cooldown_s,
        image_tokens=image_tokens,
    )


def _deployments(
    name: str, raw: dict[str, Any], upstreams: Mapping[str, UpstreamConfig]
) -> tuple[Deployment, ...]:
    """A model's deployments: the ``deployments`` list, or its ``upstream`` + ``upstream_model``
    as the one deployment."""
    where = f"models.{name}"
    listed = raw.get("deployments")
    if listed is None:
        items: list[Any] = [
            {"upstream": raw.get("upstream", ""), "upstream_model": raw.get("upstream_model")}
        ]
        places = [where]
    else:
        if "upstream" in raw or "upstream_model" in raw:
            raise ConfigError(f"{where}: give either deployments or upstream, not both")
        if not isinstance(listed, list) or not listed:
            raise ConfigError(f"{where}.deployments must be a non-empty list")
        items = listed
        places = [f"{where}.deployments[{i}]" for i in range(len(listed))]
    out: list[Deployment] = []
    for item, place in zip(items, places, strict=True):
        if not isinstance(item, dict):
            raise ConfigError(f"{place} must be a mapping of upstream, upstream_model, weight")
        unknown = sorted(set(item) - _DEPLOYMENT_KEYS)
        if unknown and listed is not None:
            raise ConfigError(f"unknown keys in {place}: {', '.join(unknown)}")
        upstream = str(item.get("upstream") or "")
        if upstream not in upstreams:
            raise ConfigError(f"{place}.upstream: no upstream named {upstream!r}")
        weight = _coerce(item.get("weight", 1), 0.0, f"{place}.weight")
        if not weight > 0 or weight == float("inf"):
            raise ConfigError(f"{place}.weight must be a number above 0")
        model = str(item.get("upstream_model") or name)
        deployment = Deployment(upstream, model, weight)
        if deployment.label in {d.label for d in out}:
            raise ConfigError(f"{place}: {deployment.label} is listed twice")
        out.append(deployment)
    return tuple(out)


def _check_fallbacks(models: Mapping[str, ModelConfig]) -> None:
    for model in models.values():
        for fallback in model.fallbacks:
            if fallback not in models:
                raise ConfigError(f"models.{model.name}.fallbacks: no model named {fallback!r}")
    cycle = find_cycle({m.name: m.fallbacks for m in models.values()})
    if cycle:
        raise ConfigError(f"models: fallback cycle {' -> '.join(cycle)}")


# The kinds of upstream; each has its module in gateway.upstream (registered in its ``kinds``).
UPSTREAM_KINDS = ("openai", "anthropic", "azure")


def _check_kind(up: UpstreamConfig) -> None:
    where = f"upstreams.{up.name}"
    if up.kind not in UPSTREAM_KINDS:
        known = ", ".join(sorted(UPSTREAM_KINDS))
        raise ConfigError(f"{where}.kind: {up.kind!r} is not one of {known}")
    if up.kind == "azure" and not up.api_version:
        raise ConfigError(f"{where}.api_version is required for azure")
    if up.kind != "azure" and up.api_version:
        raise ConfigError(f"{where}.api_version: only for azure")


def _plan(name: str, raw: Any) -> PlanConfig:
    where = f"plans.{name}"
    values = _mapping(raw, where)
    unknown = sorted(set(values) - {"seat_price", "included_usage_per_seat"})
    if unknown:
        raise ConfigError(f"unknown keys in {where}: {', '.join(unknown)}")
    try:
        return PlanConfig(
            name=name,
            seat_price=parse_usd(values.get("seat_price", 0)),
            included_usage_per_seat=parse_usd(values.get("included_usage_per_seat", 0)),
        )
    except MoneyError as exc:
        raise ConfigError(f"{where}: {exc}") from exc

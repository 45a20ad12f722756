"""The proxy API of contract section 5: what SDKs call under ``/v1`` — the request's side.

One path for every endpoint: authenticate the key (cached), parse and validate the body, size the
hold (tiktoken prompt count + the output cap, at the dearest prices of the model's routing chain),
place it (one Redis round trip that also checks the key, the model and every limit), forward the
request (:mod:`gateway.proxy.forwarding`, attempt by attempt as :mod:`gateway.proxy.routing`
decides), then settle the actual cost (the second round trip) — or release the hold when the
provider failed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from gateway import state as S
from gateway.config import ModelConfig, ServerConfig
from gateway.credentials import bearer
from gateway.errors import (
    AuthenticationFailed,
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    Refused,
    UpstreamFailed,
)
from gateway.infra import bodies
from gateway.metering.meter import HoldAsk, HoldResult, SettleAsk
from gateway.proxy import ratelines
from gateway.proxy.exchange import PASSTHROUGH, Exchange, count_texts, forwarded_headers
from gateway.proxy.keycache import KeyInfo
from gateway.proxy.routing import SERVED_BY_HEADER, Plan, Route, Router
from policies import pricing, ratelimits, usage_record
from policies import routing as rp
from policies.periods import period_of, seconds_to_period_end
from policies.translate import responses_api
from policies.translate.usage import TokenUsage

log = logging.getLogger("modelbridge.proxy")

WARNING_HEADER = "x-modelbridge-limit-warning"
TAGS_HEADER = "x-modelbridge-tags"
_MAX_TAGS = 20
_MAX_TAG_LEN = 100
_PERIOD_LIMIT_CODES = {"team_spending_limit_reached", "member_limit_reached", "key_limit_reached"}
_MESSAGES = {
    "invalid_api_key": "Incorrect API key provided.",
    "model_not_allowed": "This model is not available to your team.",
    "insufficient_quota": "You exceeded your current quota: the balance cannot cover this request.",
    "team_spending_limit_reached": "The team's spending limit for this period is reached.",
    "member_limit_reached": "Your monthly limit in this team is reached.",
    "key_expired": "This API key has expired.",
    "key_limit_reached": "This API key's monthly limit is reached.",
    "rate_limit_exceeded": "Rate limit reached: too many requests or tokens in the last minute"
    " for this key, member or team. Try again after the time in Retry-After.",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    route: str
    upstream_path: str
    kind: str  # chat | completion | embedding


CHAT = Endpoint("/v1/chat/completions", "/chat/completions", "chat")
COMPLETION = Endpoint("/v1/completions", "/completions", "completion")
EMBEDDING = Endpoint("/v1/embeddings", "/embeddings", "embedding")
MESSAGES = Endpoint("/v1/messages", "/messages", "messages")  # aiohttp: gateway.proxy.surfaces
RESPONSES = Endpoint("/v1/responses", "/responses", "responses")


@dataclass(slots=True)
class Call:
    """One proxied request on its way through the gateway."""

    app: web.Application
    endpoint: Endpoint
    secret: str
    key: KeyInfo
    model: ModelConfig
    body: dict[str, Any]
    raw: bytes
    request_id: str
    now: float
    period: str
    prompt_tokens: int
    encoding: str
    tags: str
    stream: bool = False
    wire: bytes = b""  # the plain upstream request, built while the hold is in Redis
    hold: HoldResult | None = None
    upstream_s: float = 0.0
    request: web.Request | None = None  # on aiohttp's path (not on gateway.proxy.front's)
    exchange: Exchange = PASSTHROUGH["chat"]  # client surface x upstream protocol
    translated: dict[str, Any] | None = None  # the upstream body, when translated
    route: Route | None = None  # the deployments tried (gateway.proxy.routing); set by parse
    left: Callable[[], bool] | None = None  # the lean front's "the client closed" (no request)
    client_headers: dict[str, str] | None = None  # the lean front's headers for upstream
    continues: str | None = None  # the stored response it continues (Responses API)
    note: responses_api.Note | None = None  # what to remember of the response it stored


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class Plain:
    """A provider's whole answer, priced: what the client gets and what settles."""

    body: bytes
    headers: dict[str, str]
    tokens: TokenUsage
    source: str
    charge: pricing.Charge
    ttfb_s: float


# --- parsing and validation -------------------------------------------------------------------
async def read_json(request: web.Request, server: ServerConfig) -> tuple[bytes, dict[str, Any]]:
    # decoded, capped, a stalled body refused: gateway.infra.bodies
    raw = await bodies.read_body(request, server.max_body_bytes, server.request_read_timeout_s)
    return raw, bodies.decode_json(raw)


def _check_int(body: dict[str, Any], name: str, minimum: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"'{name}' must be an integer >= {minimum}.", param=name)


def validate(endpoint: Endpoint, body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    for name, minimum in (("max_tokens", 0), ("max_completion_tokens", 0), ("n", 1)):
        _check_int(body, name, minimum)
    if endpoint.kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InvalidRequest("Each message must be an object with a 'role'.", param="messages")
    elif endpoint.kind == "completion":
        if not isinstance(body.get("prompt"), str | list):
            raise InvalidRequest("'prompt' must be a string or an array.", param="prompt")
    elif endpoint.kind == "messages":
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            msg = "max_tokens: an integer of at least 1 is required"
            raise InvalidRequest(msg, param="max_tokens")
        if not isinstance(body.get("messages"), list):
            raise InvalidRequest("messages: Field required", param="messages")
    elif not isinstance(body.get("input"), str | list) or not body.get("input"):
        raise InvalidRequest("'input' must be a non-empty string or array.", param="input")


def parse_tags(header: str | None) -> str:
    """``project=search, env=prod`` -> ``project=search,env=prod`` (validated)."""
    if not header:
        return ""
    tags = [t.strip() for t in header.split(",") if t.strip()]
    if len(tags) > _MAX_TAGS:
        raise InvalidRequest(f"at most {_MAX_TAGS} tags", param=TAGS_HEADER)
    for tag in tags:
        if len(tag) > _MAX_TAG_LEN or not tag.isprintable():
            raise InvalidRequest(
                f"tags are printable and at most {_MAX_TAG_LEN} characters", param=TAGS_HEADER
            )
    return ",".join(dict.fromkeys(tags))


def count_prompt(
    app: web.Application, endpoint: Endpoint, model: ModelConfig, body: dict[str, Any], plan: Plan
) -> tuple[int, str]:
    """The hold's prompt tokens (an image part at the most the plan's models bill for one) and
    the name of the encoding that counted them."""
    tokens = app[S.TOKENS]
    _, encoding = tokens.encoding_for(model.encoding)
    if endpoint.kind == "chat":
        return tokens.count_chat_prompt(body, model.encoding, plan.image_tokens), encoding
    if endpoint.kind == "completion":
        return tokens.count_completion_prompt(body, model.encoding), encoding
    if endpoint.kind in ("messages", "responses"):
        count = count_texts(tokens, endpoint.kind, model.encoding, body, plan.image_tokens)
        return count, encoding
    return tokens.count_embedding_input(body, model.encoding), encoding


# --- the request path ---------------------------------------------------------------------------
async def begin(request: web.Request, endpoint: Endpoint) -> Call:
    app = request.app
    secret = bearer(request)
    key = await app[S.KEYS].lookup(secret)
    raw, body = await read_json(request, app[S.CONFIG].server)
    assert secret is not None  # lookup refuses a missing key
    call = parse(app, endpoint, secret, key, raw, body, request.headers.get(TAGS_HEADER))
    call.request = request
    return call


def parse(
    app: web.Application,
    endpoint: Endpoint,
    secret: str,
    key: KeyInfo,
    raw: bytes,
    body: dict[str, Any],
    tags_header: str | None,
) -> Call:
    """Check a request's body and size what it asks for (no I/O)."""
    config = app[S.CONFIG]
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("you must provide a model parameter", param="model")
    model = config.models.get(name)
    if model is None:
        raise NotFound(f"The model '{name}' does not exist.", code="model_not_found", param="model")
    validate(endpoint, body)
    router = app[S.ROUTER]
    plan = router.plan(model, endpoint.kind)  # 400 unsupported_endpoint for no deployment
    tags = parse_tags(tags_header)
    prompt_tokens, encoding = count_prompt(app, endpoint, model, body, plan)
    now = app[S.CLOCK].now()
    route = router.route(plan, now)
    target = route.target
    call = Call(
        app=app,
        endpoint=endpoint,
        secret=secret,
        key=key,
        model=target.model,
        body=body,
        raw=raw,
        request_id=app[S.REQUEST_IDS].new(),
        now=now,
        period=period_of(now),
        prompt_tokens=prompt_tokens,
        encoding=encoding,
        tags=tags,
        stream=body.get("stream") is True and endpoint.kind != "embedding",
        exchange=target.exchange,
        route=route,
    )
    target.exchange.prepare(call)
    if endpoint.kind == "responses":
        call.continues = responses_api.continued(body)
    return call


def prepare_upstream(call: Call) -> None:
    """Build the call's upstream request for the lean client (run while the hold is in
    flight): a plain call's, or a stream's on the lean front (aiohttp's client sends the
    streams of aiohttp's path)."""
    stream = call.stream
    if not stream or call.request is None:
        upstreams, model, exchange = call.app[S.UPSTREAMS], call.model, call.exchange
        path = upstreams.path(model.upstream, exchange.route, model.upstream_model)
        body = upstream_body(call, stream) if exchange.native else exchange.body(call, stream)
        call.wire = upstreams.encode(model.upstream, path, body, forwarded_headers(call))


def output_cap(call: Call, model: ModelConfig | None = None) -> int:
    """The output tokens the request may use on ``model`` (by default the one being tried)."""
    max_output = (model or call.model).max_output_tokens
    if call.endpoint.kind == "embedding":
        return 0
    if call.endpoint.kind == "responses":
        return responses_api.output_cap(call.body, max_output)
    return pricing.requested_output_cap(call.body, max_output)


def worst_cost(call: Call) -> int:
    """The request's list cost if it used its whole output cap on the dearest model of its
    routing chain (it may be served by any): what the hold covers."""
    if call.route is None or len(call.route.plan.models) == 1:
        return pricing.worst_case_list_cost(call.model.prices, call.prompt_tokens, output_cap(call))
    prompt = call.prompt_tokens
    return rp.hold_cost(
        pricing.worst_case_list_cost(m.prices, prompt, output_cap(call, m))
        for m in call.route.plan.models
    )


def hold_ask(call: Call, worst: int) -> HoldAsk:
    key = call.key
    return HoldAsk(
        account=key.account,
        period=call.period,
        now=call.now,
        request_id=call.request_id,
        key_id=key.key_id,
        scope=key.scope,
        model=call.model.name,
        worst_list_cost=worst,
        blocked_scope=key.blocked_scope,
        tokens=call.prompt_tokens + output_cap(call),
    )


async def place_hold(call: Call) -> HoldResult:
    app = call.app
    if call.continues is not None:
        await continue_response(call)
    worst = worst_cost(call)
    for attempt in range(2):
        result = await app[S.METERING].hold(
            hold_ask(call, worst), None if attempt else partial(prepare_upstream, call)
        )
        if result.status != "invalid_api_key" or attempt:
            break
        # The cached key may bill another account by now (billing mode): look it up afresh.
        app[S.KEYS].forget(call.key.key_id)
        fresh = await app[S.KEYS].lookup(call.secret)
        if fresh == call.key:
            break
        call.key = fresh
    return await hold_taken(call, result)


async def continue_response(call: Call) -> None:
    """A request continuing a stored response (``previous_response_id``) that this account made:
    the provider bills that whole conversation again as input, so the hold counts it too, and
    the request goes to the deployment that stored it (no other has it). A response the gateway
    has no note of (made before notes were kept, lost with Redis, older than
    ``metering.response_notes_s``, or another account's) is held for what the body shows."""
    assert call.continues is not None and call.route is not None
    note = await call.app[S.METERING].recall(call.key.account, call.continues)
    if note is None:
        return
    call.prompt_tokens += note.tokens
    first = call.route.target
    target = Router.pin(call.route, note.served_by)
    if target is not None and target is not first:
        call.model, call.exchange, call.translated = target.model, target.exchange, None
        target.exchange.prepare(call)


async def hold_taken(call: Call, result: HoldResult) -> HoldResult:
    """The hold's answer taken: ``result`` when it was placed, else its refusal counted (the
    metric, the key's refusals this period) and raised. The lean front reads the answer to the
    hold it sent ahead here too, so a refused request runs ``hold.lua`` once."""
    app = call.app
    if result.status == "ok":
        return result
    if result.status == "invalid_api_key":
        app[S.KEYS].forget(call.key.key_id)
        raise AuthenticationFailed(_MESSAGES["invalid_api_key"])
    if result.status == "key_expired":
        raise AuthenticationFailed(_MESSAGES["key_expired"])
    app[S.METRICS].child(app[S.METRICS].rejections, result.status).inc()
    await app[S.METERING].count_refusal(
        call.key.account, call.period, call.key.key_id, result.status
    )
    if result.status == "model_not_allowed":
        raise Forbidden(_MESSAGES[result.status], code=result.status, param="model")
    retry = seconds_to_period_end(call.now) if result.status in _PERIOD_LIMIT_CODES else None
    if result.status == "rate_limit_exceeded":
        retry = result.retry_after
    refused = Refused(result.status, _MESSAGES[result.status], retry_after=retry)
    if result.rate is not None:
        refused.headers.update(ratelimits.headers(result.rate))
    raise refused


def upstream_body(call: Call, stream: bool) -> bytes:
    """The bytes sent upstream: the client's own unless the model name or usage option change."""
    rename = call.model.upstream_model != call.model.name
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    if not rename and (not stream or wants_usage):
        return call.raw
    body = dict(call.body)
    if rename:
        body["model"] = call.model.upstream_model
    if stream and not wants_usage:
        body["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)


def price(call: Call, tokens: TokenUsage) -> pricing.Charge:
    """What the request costs, after the discount its hold was placed with."""
    assert call.hold is not None
    prompt, completion = tokens.prompt_tokens, tokens.completion_tokens
    writes = tokens.cache_write_tokens
    cost = pricing.list_cost(call.model.prices, prompt, completion, tokens.cached_tokens, writes)
    return pricing.charge(cost, call.hold.discount_bps)


def settle_ask(
    call: Call, tokens: TokenUsage, source: str, status: int, charge: pricing.Charge
) -> SettleAsk:
    """What :meth:`Metering.settle` is asked for this request: its cost and usage record."""
    assert call.hold is not None
    key = call.key
    prompt, completion = tokens.prompt_tokens, tokens.completion_tokens
    route = call.route
    record = usage_record.opened(  # in the order of usage_record.NAMES
        (
            call.request_id,
            key.account,
            key.team_id or "",
            key.user_id,
            key.key_id,
            call.model.name,
            call.endpoint.route,
            call.period,
            prompt,
            completion,
            tokens.cached_tokens,
            charge.list_cost,
            charge.discount,
            charge.charged,
            source,
            call.encoding,
            call.tags,
            status,
            call.hold.stamp_ms or int(call.now * 1000),
            "" if route is None else route.target.served.name,
            1 if route is None else route.attempts,
        )
    )
    return SettleAsk(
        note=call.note,
        account=key.account,
        period=call.period,
        request_id=call.request_id,
        scope=key.scope,
        key_id=key.key_id,
        model=call.model.name,
        charged=charge.charged,
        record=record,
        warned=call.hold.warn,
        at=int(call.now),
        tokens=prompt + completion,
    )


def count(call: Call, tokens: TokenUsage, charge: pricing.Charge) -> None:
    metrics = call.app[S.METRICS]
    prompt, completion, spend = metrics.usage_children(call.model.name, call.key.team_id)
    metrics.add(prompt, tokens.prompt_tokens)
    metrics.add(completion, tokens.completion_tokens)
    metrics.add(spend, charge.charged / 1e9)  # metrics, not money


async def settle(call: Call, tokens: TokenUsage, source: str, status: int) -> pricing.Charge:
    charge = price(call, tokens)
    await call.app[S.METERING].settle(settle_ask(call, tokens, source, status, charge))
    count(call, tokens, charge)
    return charge


def estimate(call: Call, text: list[str]) -> TokenUsage:
    completion = call.app[S.TOKENS].count_text("".join(text), call.model.encoding) if text else 0
    return TokenUsage(call.prompt_tokens, completion)


def base_headers(call: Call) -> dict[str, str]:
    """An answer's own headers, but for the ``x-ratelimit-*`` ones: :func:`rate_headers` adds
    them on aiohttp's path, :func:`rate_lines` renders them for the lean front's heads."""
    headers = {"x-request-id": call.request_id}
    if call.route is not None:
        headers[SERVED_BY_HEADER] = call.route.target.served_by
    hold = call.hold
    if hold is not None and hold.warn:
        headers[WARNING_HEADER] = "member_limit_exceeded"
    return headers


def rate_headers(call: Call) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of the request's hold (none when no rate limit applies)."""
    rate = call.hold.rate if call.hold is not None else None
    return ratelimits.headers(rate) if rate is not None else {}


def rate_lines(call: Call) -> str:
    """:func:`rate_headers` as header lines joined by CRLF ("" when none)."""
    figures = call.hold.figures if call.hold is not None else None
    return ratelines.lines(figures) if figures is not None else ""


def count_refusal(app: web.Application, exc: GatewayError) -> None:
    """Count a refusal decided before the hold (the hold's own are counted in place_hold): an
    unknown model is a refusal of model access (contract section 7)."""
    if exc.code == "model_not_found":
        metrics = app[S.METRICS]
        metrics.child(metrics.rejections, exc.code).inc()


def annotate(exc: GatewayError, call: Call) -> None:
    """An error answered after the request was parsed: its id, and the rate-limit figures of
    its hold (a refusal carries its own)."""
    exc.headers.setdefault("x-request-id", call.request_id)
    if call.hold is not None and call.hold.rate is not None:
        for name, value in ratelimits.headers(call.hold.rate).items():
            exc.headers.setdefault(name, value)


def upstream_error(status: int, raw: bytes, upstream: str = "") -> UpstreamFailed:
    """A provider's error answer; one routing retries (429, 5xx of policies.routing) says so.
    A 401 or 403 is about the gateway's own provider key, not the client's: said so, and the
    provider's text (which may quote the key) is not passed on."""
    if status in (401, 403):
        how = "refused" if status == 401 else "denied access to"
        named = f" for upstream '{upstream}'" if upstream else ""
        return UpstreamFailed(
            f"The provider {how} the gateway's own API key{named} (HTTP {status}). Your key for "
            "this gateway was accepted: the gateway's operator must fix its provider key.",
            status=status,
        )
    error = UpstreamFailed(f"upstream error (HTTP {status})", status=status)
    with contextlib.suppress(Exception):
        message = orjson.loads(raw)["error"]["message"]
        error = UpstreamFailed(f"upstream error: {message}", status=status)
    error.upstream_body = raw  # Anthropic's clients get it unmodified
    error.retryable = rp.classify(rp.Failure.STATUS, status) is rp.Verdict.RETRY
    return error


async def release_quietly(call: Call) -> None:
    """Give the hold back (the request failed or was cancelled before it settled, or its stream
    failed before any text). Never raises: a release that fails is logged, and the hold expires
    on its own. ``call.hold`` is kept (an error answer still carries its rate-limit figures)."""
    if call.hold is None:
        return
    try:
        await call.app[S.METERING].release(
            account=call.key.account,
            request_id=call.request_id,
            key_id=call.key.key_id,
            scope=call.key.scope,
        )
    except Exception as exc:  # the hold expires on its own
        log.warning("request %s: hold not released: %r", call.request_id, exc)


def observe(
    app: web.Application,
    endpoint: Endpoint,
    model_label: str,
    status: int,
    call: Call | None,
    started: float,
) -> None:
    """A proxied request is over: count it (the in-flight gauge was raised as it began)."""
    metrics = app[S.METRICS]
    metrics.add(metrics.inflight, -1)
    elapsed = time.perf_counter() - started
    team_id = call.key.team_id if call is not None else None
    requests, duration, overhead = metrics.request_children(
        endpoint.route, model_label, status, team_id
    )
    metrics.add(requests)
    metrics.observe(duration, elapsed)
    upstream_s = call.upstream_s if call is not None else 0.0
    metrics.observe(overhead, max(0.0, elapsed - upstream_s))

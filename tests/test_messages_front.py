"""A plain ``POST /v1/messages`` on the lean front (:mod:`gateway.proxy.front`) answers as
aiohttp's path does: the same bytes sent on a lean connection and on one handed to aiohttp (a
``GET /healthz`` first) get the same status, the same headers and the same body (ids aside),
for an Anthropic upstream (passthrough) and an OpenAI one (translated), and for every error class
in Anthropic's envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from gateway.proxy import forwarding
from tests.conftest import ANTHROPIC_KEY, Providers
from tests.helpers import Api
from tests.rawhttp import CHAT, Conn, connect, counts, post

MSG = [{"role": "user", "content": "hi there"}]
BODY = {"model": "claude", "max_tokens": 50, "messages": MSG}
VERSION = "2023-06-01"
VARYING = {"date", "x-request-id", "content-length"}  # per request (ids in the bodies)


def messages(secret: str | None, body: object, **extra: str) -> bytes:
    """A request as the Anthropic SDK sends it: the key in ``x-api-key``."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Host": "gw", "anthropic-version": VERSION, "content-type": "application/json"}
    if secret is not None:
        headers["x-api-key"] = secret
    headers.update(extra)
    headers["Content-Length"] = str(len(data))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /v1/messages HTTP/1.1\r\n{head}\r\n".encode() + data


Answer = tuple[int, dict[str, str], bytes]


class Pair:
    """Two raw connections to one gateway: one lean, one handed over to aiohttp."""

    def __init__(self, lean: Conn, slow: Conn) -> None:
        self.lean, self.slow = lean, slow

    async def ask(self, request: bytes, before: Callable[[], None] = lambda: None) -> Answer:
        """Send ``request`` on both (``before`` each: the fakes' next answer); the lean answer,
        checked to be aiohttp's."""
        before()
        self.lean.send(request)
        lean = await self.lean.response()
        before()
        self.slow.send(request)
        slow = await self.slow.response()
        assert lean[0] == slow[0], (lean, slow)
        assert lean[1].keys() == slow[1].keys(), (lean[1], slow[1])
        for name in lean[1].keys() - VARYING:
            assert lean[1][name] == slow[1][name], name
        assert _without_ids(lean[2]) == _without_ids(slow[2]), (lean[2], slow[2])
        return lean


def _without_ids(raw: bytes) -> Any:
    body = orjson.loads(raw)
    body.pop("id", None)  # the provider's message id
    body.pop("request_id", None)  # the provider's request id in its error answer
    return body


@pytest.fixture
async def pair(providers: Providers) -> AsyncIterator[Pair]:
    lean, slow = await connect(providers.gateway), await connect(providers.gateway)
    slow.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")  # aiohttp's from now on
    assert (await slow.response())[0] == 200
    yield Pair(lean, slow)
    for conn in (lean, slow):
        await conn.aclose()


@pytest.mark.parametrize("model", ["claude", "gpt-4o-mini"])
async def test_a_plain_messages_call_is_served_lean_as_aiohttp_serves_it(
    providers: Providers, api: Api, pair: Pair, model: str
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    served, handed = counts(providers.gateway)
    beta = "prompt-caching-2024-07-31, tools-2024-04-04"
    request = messages(secret, {**BODY, "model": model}, **{"anthropic-beta": beta})
    status, headers, raw = await pair.ask(request)
    answer = orjson.loads(raw)
    assert (status, answer["type"], answer["content"][0]["type"]) == (200, "message", "text")
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_")
    expected = {"x-modelbridge-cost-usd", "x-modelbridge-served-by", "server", "date"}
    assert expected <= headers.keys()
    assert counts(providers.gateway) == (served + 1, handed)
    if model == "claude":  # passthrough: the client's anthropic-* headers travel upstream
        lean, slow = providers.anthropic.requests[-2:]
        for sent in (lean, slow):
            assert sent.headers["anthropic-version"] == VERSION
            assert sent.headers["anthropic-beta"] == beta
            assert sent.headers["x-api-key"] == ANTHROPIC_KEY
        assert lean.body == slow.body
    else:
        assert providers.openai.last.path == "/v1/chat/completions"


async def test_the_first_of_twice_sent_anthropic_headers_travels_as_on_aiohttp(
    providers: Providers, api: Api, pair: Pair
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    request = messages(secret, BODY).replace(
        b"\r\nHost: gw", b"\r\nHost: gw\r\nanthropic-beta: one\r\nAnthropic-Beta: two"
    )
    assert (await pair.ask(request))[0] == 200
    assert [r.headers["anthropic-beta"] for r in providers.anthropic.requests[-2:]] == ["one"] * 2
    no_version = messages(secret, BODY).replace(b"anthropic-version: 2023-06-01\r\n", b"")
    assert (await pair.ask(no_version))[0] == 200  # the upstream's default version
    assert [r.headers["anthropic-version"] for r in providers.anthropic.requests[-2:]] == [
        VERSION
    ] * 2


def _error(answer: Answer) -> tuple[int, str, str, str]:
    status, headers, raw = answer
    body = orjson.loads(raw)
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return (
        status,
        body["error"]["type"],
        headers["x-modelbridge-error-code"],
        body["error"]["message"],
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not json", (400, "invalid_request_error", "invalid_request_error")),
        ("no max_tokens", (400, "invalid_request_error", "invalid_request_error")),
        ("untranslatable", (400, "invalid_request_error", "invalid_request_error")),
        ("unknown model", (404, "not_found_error", "model_not_found")),
        ("wrong key", (401, "authentication_error", "invalid_api_key")),
        ("no key", (401, "authentication_error", "invalid_api_key")),
        ("no balance", (429, "rate_limit_error", "insufficient_quota")),
        ("provider's own error", (529, "overloaded_error", "upstream_error")),
        ("provider refuses our key", (401, "authentication_error", "upstream_error")),
        ("malformed answer", (502, "api_error", "upstream_error")),
        ("openai provider error", (503, "api_error", "upstream_error")),
    ],
)
async def test_errors_are_anthropics_envelope_on_the_lean_path_as_on_aiohttps(
    providers: Providers, api: Api, pair: Pair, case: str, expected: tuple[int, str, str]
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    body: object = BODY
    before: Callable[[], None] = lambda: None  # noqa: E731
    if case == "not json":
        body = b"{not json"
    elif case == "no max_tokens":
        body = {"model": "claude", "messages": MSG}
    elif case == "untranslatable":  # for an OpenAI upstream
        body = {**BODY, "model": "gpt-4o-mini", "messages": [{"role": "user", "content": 7}]}
    elif case == "unknown model":
        body = {**BODY, "model": "nope"}
    elif case == "wrong key":
        secret = "mb_" + "x" * 46
    elif case == "no balance":
        poor = await api.signup()
        secret = (await api.key(poor, (await api.team(poor))["id"]))["secret"]
    elif case == "provider's own error":
        before = lambda: providers.anthropic.next(status=529)  # noqa: E731
    elif case == "provider refuses our key":
        before = lambda: providers.anthropic.next(status=401)  # noqa: E731
    elif case == "malformed answer":
        before = lambda: providers.anthropic.next(malformed=True)  # noqa: E731
    elif case == "openai provider error":
        body = {**BODY, "model": "gpt-4o-mini"}
        before = lambda: providers.openai.next(status=503)  # noqa: E731
    served, handed = counts(providers.gateway)
    answer = await pair.ask(messages(None if case == "no key" else secret, body), before)
    assert _error(answer)[:3] == expected
    assert counts(providers.gateway) == (served + 1, handed)
    if expected[0] >= 500 or case.startswith("provider"):
        assert answer[1]["x-request-id"].startswith("req_")
    if case == "provider's own error":  # unmodified: the provider's own request id in it
        assert orjson.loads(answer[2])["request_id"].startswith("req_")
    overview = await api.overview(owner, team["id"])
    assert overview["credits_usd"] == "1.000000000"  # nothing charged, every hold released


async def test_a_bug_is_a_logged_500_in_anthropics_envelope_on_both_paths(
    providers: Providers,
    api: Api,
    pair: Pair,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, secret = await api.funded_team_key("1.00")

    async def broken(*args: object) -> None:
        raise RuntimeError("an injected bug")

    monkeypatch.setattr(forwarding, "ask_upstream", broken)
    answer = await pair.ask(messages(secret, BODY))
    bugs = [r for r in caplog.records if r.exc_info and "injected" in str(r.exc_info[1])]
    assert len(bugs) == 2  # one traceback per request
    assert _error(answer) == (
        500,
        "api_error",
        "internal_error",
        "The gateway failed to handle the request.",
    )


def test_the_front_reads_every_header_a_provider_forwards() -> None:
    """A header a provider kind forwards that the front did not read would be lost on the lean
    path (aiohttp's forwards it)."""
    from gateway.proxy.head import FORWARDED
    from gateway.upstream.kinds import KINDS

    forwarded = {name for kind in KINDS.values() for name in kind.forwarded_headers}
    assert forwarded == {name.decode() for name in FORWARDED}


async def test_postgresql_down_for_a_key_lookup_is_a_503_as_on_aiohttp(
    providers: Providers, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key this process has not seen is looked up in PostgreSQL: its connection failing is the
    store down (503 ``gateway_unavailable``, a warning once), not a bug (500, a traceback), on
    the lean path as on aiohttp's (where the lean front answered 500)."""
    from gateway import state as S
    from gateway.credentials import new_api_key

    async def down(*args: object) -> None:
        raise ConnectionRefusedError("PostgreSQL is down")

    monkeypatch.setattr(providers.gateway.app[S.KEYS], "_fetch", down)
    served = counts(providers.gateway)[0]
    answer = await pair.ask(messages(new_api_key(), BODY))
    assert providers.gateway.app[S.OUTAGES].down() == ["postgresql"]
    assert _error(answer) == (
        503,
        "api_error",
        "gateway_unavailable",
        "The gateway's store is unreachable; retry.",
    )
    chat = await pair.ask(post(new_api_key(), CHAT))  # the same on every lean route
    assert (chat[0], orjson.loads(chat[2])["error"]["code"]) == (503, "gateway_unavailable")
    assert counts(providers.gateway)[0] == served + 2

"""``gateway.proxy.front``: plain proxy calls served lean on raw connections, everything else
handed to aiohttp at a request boundary, and both answer the same."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from gateway import state as S
from gateway.proxy.front import State
from gateway.proxy.tokens import TokenCounter
from policies.money import format_usd
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, account_state, eventually, until
from tests.rawhttp import (
    CHAT,
    Conn,
    chunked,
    connect,
    counts,
    front_of,
    post,
    request_id_of,
    slow_client,
)


@pytest.fixture
async def conn(gateway: Gateway) -> AsyncIterator[Conn]:
    conn = await connect(gateway)
    yield conn
    await conn.aclose()


async def test_plain_calls_and_their_errors_are_served_lean_on_one_connection(
    gateway: Gateway, api: Api, conn: Conn, redis: Redis
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    served, handed = counts(gateway)
    conn.send(post(secret, CHAT))  # a key this process has not seen: looked up on the way
    status, headers, body = await conn.response()
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-modelbridge-cost-usd"] == "0.000004200"  # 4 prompt, 6 completion tokens
    assert headers["x-request-id"].startswith("req_")
    assert {"date", "server", "content-length"} <= set(headers)
    assert orjson.loads(body)["usage"]["completion_tokens"] == 6
    conn.send(post(secret, {"model": "no-such-model", "messages": []}))
    status, headers, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["code"]) == (404, "model_not_found")
    conn.send(post(secret, b"{not json"))
    status, _, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["type"]) == (400, "invalid_request_error")
    conn.send(post("mb_" + "x" * 46, CHAT))
    status, _, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["code"]) == (401, "invalid_api_key")
    conn.send(post(secret, {"model": "gpt-4o-mini", "input": "hi"}, "/v1/embeddings"))
    assert (await conn.response())[0] == 200
    assert counts(gateway) == (served + 5, handed)
    state = await account_state(redis, team["id"])
    assert state["holds"] == "0"


async def test_a_responses_call_and_its_stream_are_served_lean(
    gateway: Gateway, api: Api, conn: Conn, redis: Redis
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    served, handed = counts(gateway)
    body = {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 20}
    conn.send(post(secret, body, "/v1/responses"))
    status, headers, raw = await conn.response()
    answer = orjson.loads(raw)
    assert (status, answer["object"], answer["status"]) == (200, "response", "completed")
    assert headers["x-modelbridge-served-by"] == "fake/gpt-4o-mini"
    assert headers["x-modelbridge-cost-usd"] == format_usd(
        answer["usage"]["input_tokens"] * 150 + answer["usage"]["output_tokens"] * 600
    )
    conn.send(post(secret, {"model": "gpt-4o-mini", "input": 7}, "/v1/responses"))
    status, headers, raw = await conn.response()
    error = orjson.loads(raw)["error"]
    assert (status, error["type"], headers["x-modelbridge-error-code"]) == (
        400,
        "invalid_request_error",
        error["code"],
    )
    assert counts(gateway) == (served + 2, handed)
    conn.send(post(secret, {**body, "stream": True}, "/v1/responses"))
    status, headers, raw = await conn.response()
    assert (status, headers["content-type"].split(";")[0]) == (200, "text/event-stream")
    assert b"event: response.completed" in raw
    assert counts(gateway) == (served + 3, handed)
    assert (await account_state(redis, team["id"]))["holds"] == "0"


async def test_pipelined_requests_are_answered_in_order(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    _, _, secret = await api.funded_team_key()
    served, handed = counts(gateway)
    conn.send(post(secret, CHAT) + post(secret, {**CHAT, "max_tokens": 5}) + post(secret, CHAT))
    ids = []
    for _ in range(3):
        status, headers, _ = await conn.response()
        assert status == 200
        ids.append(headers["x-request-id"])
    assert len(set(ids)) == 3 and ids == sorted(ids)  # request ids grow with time
    assert counts(gateway) == (served + 3, handed)


async def test_a_refusal_is_the_same_envelope_as_on_aiohttps_path(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    secret = (await api.key(owner, team["id"]))["secret"]
    conn.send(post(secret, CHAT))  # no balance
    status, headers, body = await conn.response()
    assert status == 429
    assert orjson.loads(body)["error"]["code"] == "insufficient_quota"
    assert headers["x-request-id"].startswith("req_")
    await api.credit_team(team["id"], "1.00")
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200


async def test_the_refusal_of_a_hold_sent_ahead_is_answered_from_its_one_reply(
    gateway: Gateway, api: Api, conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A known key's hold is sent before any await; when Redis refuses it, that reply is the
    answer: the refusal is counted once and ``hold.lua`` is not run a second time for it."""
    owner, team, _ = await api.funded_team_key()
    payload = {"name": "one a minute", "team": team["id"], "rpm": 1}
    _, key = await api.call("POST", "/api/keys", session=owner, json=payload, expect=201)
    conn.send(post(key["secret"], CHAT))  # looked up on the way: cached from now on
    assert (await conn.response())[0] == 200
    metering = gateway.app[S.METERING]
    held = metering.hold
    held_again: list[object] = []

    async def hold(*args: object, **kwargs: object) -> object:
        held_again.append(args)
        return await held(*args, **kwargs)

    monkeypatch.setattr(metering, "hold", hold)
    served, handed = counts(gateway)
    conn.send(post(key["secret"], CHAT))
    status, headers, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["code"]) == (429, "rate_limit_exceeded")
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert counts(gateway) == (served + 1, handed)
    assert held_again == []
    _, keys = await api.call("GET", f"/api/keys?team={team['id']}", session=owner, expect=200)
    (listed,) = [k for k in keys["data"] if k["id"] == key["id"]]
    assert listed["refused_this_period"] == {"rate_limit_exceeded": 1}


async def test_an_upstream_failure_after_the_hold_releases_it(
    gateway: Gateway, api: Api, conn: Conn, fake: FakeUpstream, redis: Redis
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200  # the key is cached: the next hold is sent at once
    fake.next(status=503)
    conn.send(post(secret, CHAT))
    status, headers, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["code"]) == (503, "upstream_error")
    assert headers["x-request-id"].startswith("req_")
    assert (await account_state(redis, team["id"]))["holds"] == "0"


@pytest.mark.parametrize("upstream_status", [503, 429, 400])
async def test_a_stream_the_provider_refuses_is_answered_in_openais_envelope(
    gateway: Gateway, api: Api, conn: Conn, fake: FakeUpstream, redis: Redis, upstream_status: int
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    rpm = {"rpm_limit": 1000}  # a rate limit, for its headers on the error too
    await api.call("PATCH", f"/api/teams/{team['id']}", session=owner, json=rpm, expect=200)
    served, handed = counts(gateway)
    fake.next(status=upstream_status)
    conn.send(post(secret, {**CHAT, "stream": True}))
    status, headers, body = await conn.response()
    error = orjson.loads(body)["error"]
    assert (status, error["code"], headers["content-type"]) == (
        upstream_status,
        "upstream_error",
        "application/json",
    )
    assert headers["x-modelbridge-error-code"] == "upstream_error"
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-ratelimit-limit-requests"] == "1000"
    assert (await account_state(redis, team["id"]))["holds"] == "0"
    assert counts(gateway) == (served + 1, handed)
    conn.send(post(secret, {**CHAT, "stream": True}))  # the connection goes on
    status, headers, body = await conn.response()
    assert (status, headers["x-ratelimit-limit-requests"]) == (200, "1000")
    assert body.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize(
    "first",
    [
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",  # another route
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
async def test_other_requests_go_to_aiohttp_for_the_rest_of_the_connection(
    gateway: Gateway, api: Api, conn: Conn, first: bytes
) -> None:
    _, _, secret = await api.funded_team_key()
    served, handed = counts(gateway)
    conn.send(first)
    assert (await conn.response())[0] in (200, 401)
    if b"HTTP/1.0" in first:
        return  # HTTP/1.0 closes after its answer
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200
    assert counts(gateway) == (served, handed + 1)


async def test_a_stream_and_the_call_pipelined_behind_it_are_served_lean(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    _, _, secret = await api.funded_team_key()
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200
    served, handed = counts(gateway)
    conn.send(post(secret, {**CHAT, "stream": True}) + post(secret, CHAT))
    status, headers, body = await conn.response()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert (headers["transfer-encoding"], headers["cache-control"]) == ("chunked", "no-cache")
    assert body.rstrip().endswith(b"data: [DONE]")
    assert (await conn.response())[0] == 200  # the pipelined one
    assert counts(gateway) == (served + 2, handed)


async def test_a_stream_after_lean_calls_is_handed_over_with_the_bytes_already_read(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    _, _, secret = await api.funded_team_key()
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200
    served, handed = counts(gateway)
    body = chunked(orjson.dumps({**CHAT, "stream": True}))  # a chunked body: aiohttp's
    conn.send(post(secret, body, **{"Transfer-Encoding": "chunked"}) + post(secret, CHAT))
    status, headers, body = await conn.response()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert body.rstrip().endswith(b"data: [DONE]")
    assert (await conn.response())[0] == 200  # the pipelined one, now aiohttp's
    assert counts(gateway) == (served, handed + 1)
    # the lean front's stream head is aiohttp's: the same headers in the same order
    lean = await connect(gateway)
    try:
        lean.send(post(secret, {**CHAT, "stream": True}))
        status, lean_headers, body = await lean.response()
    finally:
        lean.writer.close()
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert list(lean_headers) == list(headers)
    same = {"content-type", "cache-control", "transfer-encoding", "server"}
    assert {k: lean_headers[k] for k in same} == {k: headers[k] for k in same}
    assert counts(gateway) == (served + 1, handed + 1)


@pytest.mark.parametrize(
    "extra",
    [
        {"Expect": "100-continue"},
        {"Content-Length": "2", "content-length": "3"},  # ambiguous framing
    ],
)
async def test_framing_front_does_not_take_is_aiohttps(
    gateway: Gateway, api: Api, conn: Conn, extra: dict[str, str]
) -> None:
    _, _, secret = await api.funded_team_key()
    served, handed = counts(gateway)
    if "Expect" in extra:
        conn.send(post(secret, CHAT, **extra))
        status, _, _ = await conn.response()
        if status == 100:
            status, _, _ = await conn.response()
        assert status == 200
    else:
        conn.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\n{}"
        )
        assert (await conn.response())[0] == 400
    assert counts(gateway)[1] == handed + 1 and counts(gateway)[0] == served


async def test_a_chunked_body_is_served_by_aiohttp(gateway: Gateway, api: Api, conn: Conn) -> None:
    _, _, secret = await api.funded_team_key()
    conn.send(post(secret, chunked(orjson.dumps(CHAT)), **{"Transfer-Encoding": "chunked"}))
    assert (await conn.response())[0] == 200


async def test_the_rate_limit_headers_are_the_same_lean_and_on_aiohttps_path(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    owner, team, secret = await api.funded_team_key()
    limits = {"rpm_limit": 1000, "tpm_limit": 10**7}
    await api.call("PATCH", f"/api/teams/{team['id']}", session=owner, json=limits, expect=200)
    gateway.clock.fixed = gateway.clock.now()  # one stamp: every reset is the whole window
    served, handed = counts(gateway)
    answers = []
    for lean in (True, False):  # aiohttp's keeps the connection once it has it
        for stream in (False, True):
            body = orjson.dumps({**CHAT, "stream": stream})
            extra = {} if lean else {"Transfer-Encoding": "chunked"}
            conn.send(post(secret, body if lean else chunked(body), **extra))
            answers.append(await conn.response())
    assert counts(gateway) == (served + 2, handed + 1)
    for left, (status, headers, _) in zip((999, 998, 997, 996), answers, strict=True):
        rate = {name: value for name, value in headers.items() if "ratelimit" in name}
        tokens_left = int(rate.pop("x-ratelimit-remaining-tokens"))
        assert (status, rate) == (
            200,
            {
                "x-ratelimit-limit-requests": "1000",
                "x-ratelimit-remaining-requests": str(left),
                "x-ratelimit-reset-requests": "1m0s",
                "x-ratelimit-limit-tokens": "10000000",
                "x-ratelimit-reset-tokens": "1m0s",
            },
        )
        assert 0 < tokens_left < 10**7


async def test_connection_close_is_honoured(gateway: Gateway, api: Api, conn: Conn) -> None:
    _, _, secret = await api.funded_team_key()
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200
    conn.send(post(secret, CHAT, Connection="close"))
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == (200, "close")
    assert await conn.closed()


async def test_a_body_over_the_cap_is_413(gateway: Gateway, api: Api, conn: Conn) -> None:
    _, _, secret = await api.funded_team_key()
    cap = gateway.config.server.max_body_bytes
    big = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"a" * cap + b'"}]}'
    conn.send(post(secret, big))
    status, _, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["code"]) == (413, "payload_too_large")


async def test_shutdown_lets_a_lean_request_finish_and_closes_idle_connections(
    fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession
) -> None:
    gw, runner = await start_gateway(gateway_config(fake.base_url), database_url, redis_url)
    idle, busy = await connect(gw), await connect(gw)
    try:
        _, _, secret = await Api(http, gw.base, ADMIN_TOKEN).funded_team_key()
        idle.send(post(secret, CHAT))
        assert (await idle.response())[0] == 200
        seen = len(fake.requests)
        fake.next(delay_s=0.5)
        busy.send(post(secret, CHAT))
        await fake.wait_until(lambda: len(fake.requests) == seen + 1)
        stopping = asyncio.ensure_future(runner.cleanup())
        assert await idle.closed()
        assert (await busy.response())[0] == 200  # answered while the gateway stops
        await asyncio.wait_for(stopping, 10)
        assert gw.app[S.FRONTS].connections == set()
    finally:
        for conn in (idle, busy):
            conn.writer.close()


async def test_a_client_that_pipelines_without_reading_is_paused_not_dropped(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    _, _, secret = await api.funded_team_key("100.00")
    served = counts(gateway)[0]
    conn.send(post(secret, CHAT) * 300)  # ~300 KB of answers pile up before the client reads
    statuses = [(await conn.response())[0] for _ in range(300)]
    assert statuses == [200] * 300
    assert counts(gateway)[0] == served + 300


async def test_an_idle_connection_is_closed_after_the_keepalive_time(
    gateway: Gateway, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.proxy import front

    _, _, secret = await api.funded_team_key()
    monkeypatch.setattr(front, "KEEPALIVE_S", 0.3)
    conn = await connect(gateway)
    try:
        conn.send(post(secret, CHAT))
        assert (await conn.response())[0] == 200
        assert await conn.closed()  # within Conn's 10 s read deadline
    finally:
        conn.writer.close()


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (
            HEAD + b"\r\nAuthorization: Bearer AbC\r\nContent-Length: 12",
            {b"authorization": b"Bearer AbC", b"content-length": b"12"},
        ),
        (
            HEAD + b"\r\ncontent-length:7\r\nX-API-KEY:  k1 \r\nConnection: close",
            {b"content-length": b"7", b"x-api-key": b"k1", b"connection": b"close"},
        ),
        (
            HEAD + b"\r\nContent-Length: 3\r\nX-ModelBridge-Tags: a=1, b=2",
            {b"content-length": b"3", b"x-modelbridge-tags": b"a=1, b=2"},
        ),
        (HEAD + b"\r\nContent-Length: 3\r\nContent-Length: 3", None),  # twice
        (HEAD + b"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", None),
        (HEAD + b"\r\nContent-Length: 3\r\nExpect: 100-continue", None),
        (HEAD + b"\r\nContent-Length: 3\r\nX-A: 1\r\n folded", None),
        (HEAD + b"\r\nContent-Length : 3", None),  # no length Front can trust
        (HEAD + b"\r\nContent-Length: -3", None),
        (HEAD + b"\r\nContent-Length: 3\r\nX-Name: caf\xc3\xa9", None),
        (HEAD + b"\r\nContent-Length: 3\r\nno colon here", None),
        (HEAD + b"\r\nContent-Length: 3\r\nBad Name: x", None),
        (HEAD + b"\r\nContent-Length: 3\r\nX-Nul: a\x00b", None),
        (HEAD, None),  # no length at all
        (HEAD.replace(b"POST", b"GET") + b"\r\nContent-Length: 3", None),
        (HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\nContent-Length: 3", None),
        (HEAD.replace(b"completions ", b"completions?x=1 ") + b"\r\nContent-Length: 3", None),
        (HEAD.replace(b"chat/", b"") + b"\r\nContent-Length: 3", "completion"),
    ],
)
def test_read_head(head: bytes, expected: object) -> None:
    from gateway.proxy.head import HandOver, read_head

    if expected is None:
        with pytest.raises(HandOver):
            read_head(head)
        return
    parsed = read_head(head)
    if expected == "completion":
        assert (parsed.path, parsed.length) == (b"/v1/completions", 3)
        return
    assert parsed.path == b"/v1/chat/completions"
    assert parsed.headers == expected
    assert parsed.length == int(parsed.headers[b"content-length"])


async def test_the_openai_sdks_calls_are_served_lean(gateway: Gateway, api: Api) -> None:
    from tests.people import client

    _, _, secret = await api.funded_team_key()
    served, handed = counts(gateway)
    async with client(gateway, secret) as sdk:
        for _ in range(3):
            reply = await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 6
        embedded = await sdk.embeddings.create(model="gpt-4o-mini", input="hi")
        assert embedded.data
    assert counts(gateway) == (served + 4, handed)


async def test_a_bug_before_the_hold_is_a_logged_500_not_a_dropped_connection(
    gateway: Gateway, api: Api, conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.proxy import handlers as proxy

    _, _, secret = await api.funded_team_key()
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200  # the key is cached now: the fast path
    handed = counts(gateway)[1]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy, "parse", broken)
    conn.send(post(secret, CHAT))
    status, _, body = await conn.response()
    assert (status, orjson.loads(body)["error"]["type"]) == (500, "server_error")
    assert counts(gateway)[1] == handed + 1


@pytest.mark.parametrize("upstream_status", [499, 520, 524, 529, 599, 418])
async def test_a_provider_status_without_a_standard_phrase_is_relayed(
    gateway: Gateway, api: Api, conn: Conn, fake: FakeUpstream, redis: Redis, upstream_status: int
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200  # the key is cached: the fast path
    before = await account_state(redis, team["id"])
    fake.next(status=upstream_status)
    conn.send(post(secret, CHAT))
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n"), 10)
    phrase = {418: "I'm a Teapot"}.get(upstream_status, "")
    assert head == f"HTTP/1.1 {upstream_status} {phrase}\r\n".encode()
    rest = await conn.response_after_status_line(upstream_status)
    assert (rest[0], orjson.loads(rest[2])["error"]["code"]) == (upstream_status, "upstream_error")
    assert await account_state(redis, team["id"]) == before  # the hold released, nothing charged
    conn.send(post(secret, CHAT))  # the connection still serves
    assert (await conn.response())[0] == 200


def _one_broken(target: object, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``target.name`` raise once, then behave again."""
    original = getattr(target, name)
    calls = 0

    def broken(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("an injected bug")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, broken)


@pytest.mark.parametrize("where", ["writing the answer", "after the answer"])
async def test_an_unexpected_error_anywhere_in_serving_closes_the_connection_logged(
    gateway: Gateway,
    api: Api,
    conn: Conn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    from gateway.proxy import handlers as proxy

    _, _, secret = await api.funded_team_key()
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200
    front = await front_of(gateway, conn)
    await until(lambda: front.task is None)  # settled and observed: nothing left of it to break
    if where == "writing the answer":  # the answer, then the 500 for it, both fail to be written
        monkeypatch.setattr(gateway.app[S.FRONTS], "date", _raises)
    else:
        _one_broken(proxy, "observe", monkeypatch)
    conn.send(post(secret, CHAT))
    if where == "after the answer":
        assert (await conn.response())[0] == 200
    assert await conn.closed()
    errors = [r for r in caplog.records if r.name == "modelbridge.front" and r.exc_info]
    assert errors and "closing" in errors[-1].getMessage()


def _raises(*args: object) -> str:
    raise RuntimeError("an injected bug")


async def test_one_request_in_service_while_a_slow_reader_drains_pipelined_answers(
    gateway: Gateway, api: Api, fake: FakeUpstream
) -> None:
    """The client pipelines, then stops reading: its first answer fills the socket buffers and
    the front's writes pause. A request arriving then must wait for the client to read, not
    start beside the next one; the answers leave in order."""
    _, _, secret = await api.funded_team_key("100.00")
    fake.set_default(content_pieces=["x" * 1_000_000])  # far more than the socket buffers hold

    def ask(n: int, **behaviour: float) -> bytes:
        marker = orjson.dumps({"prompt_tokens": n, **behaviour}).decode()
        return post(
            secret, {**CHAT, "messages": [{"role": "user", "content": f"[[fake:{marker}]]"}]}
        )

    slow, front = await slow_client(gateway)
    try:
        slow.send(ask(1) + ask(2, delay_s=0.5))
        # answer 1 is out but stuck in the buffers: the front waits for the client to read
        await until(lambda: front._write_paused and front.task is None)
        third = ask(3)
        slow.send(third)  # arrives while the front waits for the client to read
        await until(lambda: front.buffer.endswith(third) or len(fake.requests) > 1)
        assert len(fake.requests) == 1  # nothing more goes upstream while the client does not read
        assert (front.state, front.task) == (State.DRAINING, None)  # 2 and 3 wait in the buffer
        answers = [await slow.response() for _ in range(3)]
    finally:
        slow.writer.close()
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert [orjson.loads(body)["usage"]["prompt_tokens"] for _, _, body in answers] == [1, 2, 3]
    assert fake.peak_inflight == 1  # never two of the connection's requests at the provider


async def test_a_provider_body_over_max_response_bytes_is_a_502_and_charges_nothing(
    fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession, redis: Redis
) -> None:
    config = gateway_config(fake.base_url)
    bounded = dataclasses.replace(config.upstreams["fake"], max_response_bytes=4000)
    config = dataclasses.replace(config, upstreams={"fake": bounded})
    gw, runner = await start_gateway(config, database_url, redis_url)
    lean, handed = await connect(gw), await connect(gw)
    try:
        _, team, secret = await Api(http, gw.base, ADMIN_TOKEN).funded_team_key("1.00")
        handed.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")  # aiohttp's from now on
        assert (await handed.response())[0] == 200
        lean.send(post(secret, CHAT))
        assert (await lean.response())[0] == 200  # under the bound
        before = await account_state(redis, team["id"])
        served = gw.app[S.FRONTS].served
        for conn in (lean, handed):
            fake.next(content_pieces=["x" * 5000])
            conn.send(post(secret, CHAT))
            status, headers, body = await conn.response()
            error = orjson.loads(body)["error"]
            assert (status, error["code"]) == (502, "upstream_error")
            assert error["message"] == (
                "upstream fake answered more than 4000 bytes (max_response_bytes)"
            )
            assert headers["x-request-id"].startswith("req_")
            assert await account_state(redis, team["id"]) == before  # released, not charged
        assert gw.app[S.FRONTS].served == served + 1  # one lean, one on aiohttp's path
        # a stream past the bound ends as a stream the provider cut: the error event, no [DONE]
        counter = TokenCounter()  # billed as a cut stream: tiktoken on what was relayed
        prompt = counter.count_chat_prompt(CHAT, "o200k_base")
        completion = counter.count_text("x" * 2000, "o200k_base")
        for conn in (lean, handed):
            served, handed_over = counts(gw)
            fake.next(content_pieces=["x" * 1000] * 6)
            conn.send(post(secret, {**CHAT, "stream": True}))
            status, headers, body = await conn.response()
            assert (status, headers["content-type"]) == (200, "text/event-stream")
            assert b'"code":"upstream_error"' in body and b"[DONE]" not in body
            assert body.count(b"x" * 1000) == 2  # the events within the first 4000 bytes
            state = await account_state(redis, team["id"])
            assert state["holds"] == "0"
            charged = int(before["credits"]) - int(state["credits"])
            assert charged == prompt * 150 + completion * 600
            before = state
            assert counts(gw) == (
                (served + 1, handed_over) if conn is lean else (served, handed_over)
            )
    finally:
        for conn in (lean, handed):
            conn.writer.close()
        await runner.cleanup()


async def test_redis_down_is_503_on_the_lean_path_and_never_forwarded(
    gateway: Gateway, api: Api, conn: Conn, fake: FakeUpstream
) -> None:
    from gateway.metering.scriptclient import Endpoint, ScriptClient
    from gateway.metering.scripts import Scripts

    _, _, secret = await api.funded_team_key()
    _, _, fresh = await api.funded_team_key()  # a key this process has not looked up yet
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200  # cached: its hold goes from data_received

    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # a Redis that drops the script connection at its first command
        writer.close()

    dying = await asyncio.start_server(dies, "127.0.0.1", 0)
    script_client = ScriptClient(
        Endpoint("127.0.0.1", dying.sockets[0].getsockname()[1], 0, None, None)
    )
    broken = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    metering = gateway.app[S.METERING]
    saved = metering.scripts
    metering.scripts = Scripts(broken, script_client)
    served, handed = counts(gateway)
    forwarded = len(fake.requests)
    try:
        await script_client._connection()  # open, as the gateway's own is
        for key in (secret, secret, fresh):  # sent at once, sent after a reconnect, looked up
            conn.send(post(key, CHAT))
            status, _, body = await conn.response()
            assert (status, orjson.loads(body)["error"]["code"]) == (503, "gateway_unavailable")
    finally:
        metering.scripts = saved
        await script_client.close()
        await broken.aclose()
        dying.close()
    assert counts(gateway) == (served + 3, handed)  # all three on the lean path
    assert len(fake.requests) == forwarded
    conn.send(post(secret, CHAT))
    assert (await conn.response())[0] == 200


async def test_edge_heads_on_a_real_socket_are_read_as_llhttp_reads_them(
    gateway: Gateway, api: Api, conn: Conn
) -> None:
    """A few of tests/test_head.py's cases end to end: what the front serves it serves as llhttp
    reads it, the rest aiohttp answers (never a wait for bytes that will not come)."""
    _, _, secret = await api.funded_team_key()
    served, handed = counts(gateway)
    conn.send(post(secret, CHAT, Connection="closed"))  # no "close" option: kept alive
    assert (await conn.response())[0] == 200
    conn.send(post(secret, CHAT, Authorization=f"Bearer {secret}  "))  # OWS is not the value
    assert (await conn.response())[0] == 200
    conn.send(post(secret, CHAT, Connection="keep-alive, close"))
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == (200, "close")
    assert await conn.closed()
    assert counts(gateway) == (served + 3, handed)

    for raw, expected in (
        (post(secret, CHAT).replace(b"\r\n", b"\n"), 400),  # bare LF line ends: refused
        (post(secret, CHAT, Connection="close", connection="keep-alive"), 200),
    ):
        other = await connect(gateway)
        try:
            other.send(raw)
            assert (await other.response())[0] == expected  # aiohttp's answer
            assert await other.closed()  # either way, as llhttp reads it
        finally:
            other.writer.close()
    assert counts(gateway) == (served + 3, handed + 2)


async def test_shutdown_past_its_deadline_cuts_a_lean_stream_and_bills_what_was_streamed(
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    config = gateway_config(fake.base_url)
    server = dataclasses.replace(config.server, shutdown_timeout_s=0.3)
    gw, runner = await start_gateway(
        dataclasses.replace(config, server=server), database_url, redis_url
    )
    conn = await connect(gw)
    pieces = ["alpha", " beta", " gamma", " delta", " epsilon", " zeta"]
    try:
        _, team, secret = await Api(http, gw.base, ADMIN_TOKEN).funded_team_key()
        served, handed = counts(gw)
        fake.next(chunk_delay_s=0.4, content_pieces=pieces)  # 2.4 s: longer than shutdown waits
        conn.send(post(secret, {**CHAT, "stream": True}))
        seen = await conn.reader.readuntil(b"alpha")
        request_id = request_id_of(seen)
        await runner.cleanup()
        rest = await asyncio.wait_for(conn.reader.read(), 10)  # until the gateway closes
        assert counts(gw) == (served + 1, handed)
    finally:
        conn.writer.close()
    assert b"[DONE]" not in rest and not rest.endswith(b"0\r\n\r\n")  # cut, not ended
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id),
        lambda r: r is not None,
    )
    counter = TokenCounter()
    prefixes = {counter.count_text("".join(pieces[:n]), "o200k_base") for n in range(1, 7)}
    assert (row["usage_source"], row["status"]) == ("estimated", 499)
    assert row["completion_tokens"] in prefixes
    prompt = counter.count_chat_prompt(CHAT, "o200k_base")
    assert row["charged"] == prompt * 150 + row["completion_tokens"] * 600
    assert (await account_state(redis, team["id"]))["holds"] == "0"


async def test_a_client_that_does_not_read_its_stream_pauses_the_provider(
    gateway: Gateway, api: Api, fake: FakeUpstream
) -> None:
    _, _, secret = await api.funded_team_key("100.00")
    slow, front = await slow_client(gateway)
    try:
        served, handed = counts(gateway)
        pieces = [f"piece {i} " + "lorem ipsum dolor " * 800 for i in range(100)]  # ~1.4 MB
        fake.next(content_pieces=pieces)
        slow.send(post(secret, {**CHAT, "stream": True}))

        def provider_paused() -> bool:
            stream = front._stream
            upstream = stream.upstream if stream is not None else None
            return upstream is not None and upstream._live and upstream._conn.paused

        await until(provider_paused)
        status, _, body = await slow.response()
    finally:
        slow.writer.close()
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert all(piece.encode() in body for piece in pieces)
    assert counts(gateway) == (served + 1, handed)


async def test_shutdown_lets_a_lean_stream_finish_and_bills_it(
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> None:
    gw, runner = await start_gateway(gateway_config(fake.base_url), database_url, redis_url)
    conn = await connect(gw)
    try:
        _, _, secret = await Api(http, gw.base, ADMIN_TOKEN).funded_team_key()
        served, handed = counts(gw)
        fake.next(chunk_delay_s=0.2)  # ~1.6 s, within the 5 s shutdown_timeout_s
        conn.send(post(secret, {**CHAT, "stream": True}))
        head = await conn.reader.readuntil(b"\r\n\r\n")  # the stream has begun
        request_id = request_id_of(head)
        stopping = asyncio.ensure_future(runner.cleanup())
        body = await asyncio.wait_for(conn._chunked(), 10)
        await asyncio.wait_for(stopping, 10)
        assert counts(gw) == (served + 1, handed)
    finally:
        conn.writer.close()
    assert body.rstrip().endswith(b"data: [DONE]")
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id),
        lambda r: r is not None,
    )
    assert (row["usage_source"], row["completion_tokens"], row["status"]) == ("upstream", 6, 200)


async def test_a_stream_ends_for_its_client_at_done_before_the_providers_end_of_body(
    database_url: str, redis_url: str, http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    release = asyncio.Event()
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    events = [
        {"id": "c1", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hi"}}]},
        {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage},
    ]
    sse = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]

    async def provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for data in sse:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()
        await release.wait()  # the end of body only once the client has its whole stream
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(provider, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    gw, runner = await start_gateway(
        gateway_config(f"http://127.0.0.1:{upstream_port}/v1"), database_url, redis_url
    )
    conn = await connect(gw)
    try:
        _, _, secret = await Api(http, gw.base, ADMIN_TOKEN).funded_team_key()
        conn.send(post(secret, {**CHAT, "stream": True}))
        status, headers, body = await conn.response()
        assert not release.is_set()  # the provider has not ended its body yet
        release.set()
    finally:
        conn.writer.close()
        await runner.cleanup()
        server.close()
    assert status == 200 and body == sse[0] + sse[2]  # the usage chunk stripped
    row = await eventually(
        lambda: db.fetchrow(
            "SELECT * FROM usage_records WHERE request_id = $1", headers["x-request-id"]
        ),
        lambda r: r is not None,
    )
    assert (row["usage_source"], row["status"], row["charged"]) == ("upstream", 200, 1950)

"""The proxy API through the official openai SDK: exact costs, streaming, pass-through.

Under ``--redis-cluster`` the priced, streamed and revoked requests go to the second gateway
process too (``tests/replicas.py``), the management calls to the first."""

from __future__ import annotations

import asyncpg
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, eventually
from tests.rawhttp import counts
from tests.replicas import Endpoint, Replicas

pytestmark = pytest.mark.cluster

# Fake upstream rule: chat prompt = 3 per message + words; completion = 6 pieces by default.
# gpt-4o-mini: 150 nano-USD per input token, 600 per output token.
HI_COST = 5 * 150 + 6 * 600  # "hi there": 3 + 2 prompt tokens, 6 completion tokens


def client(gateway: Endpoint, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=10)


async def usage_row(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id)

    row = await eventually(probe, lambda r: r is not None)
    assert row is not None
    return row


async def test_chat_completion_is_priced_and_debited(
    replicas: Replicas, api: Api, fake: FakeUpstream, db: asyncpg.Connection
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    raw = await client(replicas.other, secret).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert raw.headers["x-modelbridge-cost-usd"] == "0.000004350"
    request_id = raw.headers["x-request-id"]
    overview = await api.overview(owner, team["id"])
    assert overview["credits_usd"] == "0.999995650"
    assert overview["spend_this_period_usd"] == "0.000004350"
    row = await usage_row(db, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["charged"], row["list_cost"]) == (
        5,
        6,
        HI_COST,
        HI_COST,
    )
    assert row["usage_source"] == "upstream" and row["from_credits"] == HI_COST
    # The client's key never travels upstream; the upstream's key does.
    sent = fake.last
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert secret not in str(sent.headers)


async def test_unknown_fields_pass_through_and_model_is_renamed(
    gateway: Gateway, api: Api, fake: FakeUpstream
) -> None:
    _, _, secret = await api.funded_team_key()
    await client(gateway, secret).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        extra_body={"custom_flag": {"a": [1, 2]}},
        seed=7,
    )
    body = fake.last.body
    assert body["model"] == "gpt-4o-2024-08-06"
    assert body["custom_flag"] == {"a": [1, 2]} and body["seed"] == 7


async def test_stream_without_usage_request_strips_the_usage_chunk(
    replicas: Replicas, api: Api, fake: FakeUpstream
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    stream = await client(replicas.other, secret).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "Hello from the fake upstream."
    )
    assert all(c.choices for c in chunks), (
        "the usage-only chunk must not reach a client that did not ask"
    )
    assert fake.last.body["stream_options"] == {"include_usage": True}
    overview = await eventually(
        lambda: api.overview(owner, team["id"]),
        lambda o: o["spend_this_period_usd"] != "0.000000000",
    )
    assert overview["spend_this_period_usd"] == "0.000004350"


async def test_stream_with_usage_request_keeps_the_usage_chunk(gateway: Gateway, api: Api) -> None:
    _, _, secret = await api.funded_team_key()
    served, handed = counts(gateway)
    stream = await client(gateway, secret).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 6)
    assert counts(gateway) == (served + 1, handed)  # the lean front's


async def test_completions_and_embeddings(
    gateway: Gateway, api: Api, db: asyncpg.Connection
) -> None:
    _, _, secret = await api.funded_team_key()
    c = client(gateway, secret)
    raw = await c.completions.with_raw_response.create(model="gpt-4o-mini", prompt="one two three")
    assert raw.headers["x-modelbridge-cost-usd"] == "0.000004050"  # 3 * 150 + 6 * 600
    raw = await c.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a b", "c d e f"]
    )
    assert raw.headers["x-modelbridge-cost-usd"] == "0.000000120"  # 6 tokens * 20
    row = await usage_row(db, raw.headers["x-request-id"])
    assert (row["endpoint"], row["prompt_tokens"], row["completion_tokens"]) == (
        "/v1/embeddings",
        6,
        0,
    )


async def test_models_lists_configured_models(gateway: Gateway, api: Api) -> None:
    _, _, secret = await api.funded_team_key()
    c = client(gateway, secret)
    ids = [m.id async for m in c.models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    assert (await c.models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("nope")


async def test_bad_keys_are_refused(gateway: Gateway, api: Api) -> None:
    for key in ("", "sk-not-ours", "mb_" + "a" * 46):
        with pytest.raises(openai.AuthenticationError) as err:
            await client(gateway, key or "x").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.code == "invalid_api_key"


async def test_revoked_key_fails_on_next_request(replicas: Replicas, api: Api) -> None:
    """Revoked through the first process: refused at once on every process, which all had it
    cached."""
    owner, team, _ = await api.funded_team_key()
    key = await api.key(owner, team["id"])
    clients = [client(to, key["secret"]) for to in (replicas.other, replicas.first)]
    for c in clients:
        await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    await api.call("DELETE", f"/api/keys/{key['id']}", session=owner, expect=200)
    for c in clients:
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()


async def test_insufficient_quota(gateway: Gateway, api: Api) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    key = await api.key(owner, team["id"])
    with pytest.raises(openai.RateLimitError) as err:
        await client(gateway, key["secret"]).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "insufficient_quota"
    assert err.value.body["type"] == "insufficient_quota"  # type: ignore[index]

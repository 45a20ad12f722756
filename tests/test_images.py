"""An image part is held at the most one image can cost on the model (``policies/images.py``):
the documented worst cases by model family, a model's ``image_tokens`` in config over them, and
the hold of each surface (Chat Completions, Responses, Messages) sized with it, to the
nano-dollar."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway import state as S
from gateway.config import ConfigError, parse_config
from gateway.proxy.exchange import count_texts
from policies import images
from tests.conftest import Gateway, gateway_settings
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api


@pytest.mark.parametrize(
    ("upstream_model", "expected"),
    [
        ("gpt-4o", 85 + 8 * 170),
        ("gpt-4o-2024-08-06", 1_445),  # a dated snapshot: its family's
        ("GPT-4o", 1_445),
        ("gpt-4o-mini", 2_833 + 8 * 5_667),  # gpt-4o's price per image, in cheaper tokens
        ("gpt-4o-mini-2024-07-18", 48_169),  # the longest prefix wins, not gpt-4o's
        ("gpt-4.1", 1_445),
        ("gpt-4.1-mini", 2_489),  # 1,536 patches x 1.62, rounded up
        ("gpt-4.1-nano-2025-04-14", 3_779),  # x 2.46
        ("o4-mini", 2_642),  # x 1.72
        ("o1", 75 + 8 * 150),
        ("o3-2025-04-16", 1_275),
        ("computer-use-preview", 65 + 8 * 129),
        ("gpt-4ox", images.DEFAULT),  # a prefix only counts up to a '-'
        ("claude-sonnet-4-5", 5_000),  # above Claude's largest image (~4,800)
        ("gpt4o-prod", 5_000),  # an Azure deployment's own name: unknown, so the default
        ("", 5_000),
    ],
)
def test_image_tokens_by_model(upstream_model: str, expected: int) -> None:
    assert images.image_tokens(upstream_model) == expected


def test_a_model_takes_its_dearest_deployment_unless_configured(fake: FakeUpstream) -> None:
    settings = gateway_settings(fake.base_url)
    settings["models"] = {
        "duo": {
            "deployments": [
                {"upstream": "fake", "upstream_model": "gpt-4o"},
                {"upstream": "fake", "upstream_model": "gpt-4o-mini"},
            ]
        },
        "tight": {"upstream": "fake", "upstream_model": "gpt-4o-mini", "image_tokens": 2_833},
        "local": {"upstream": "fake", "upstream_model": "llava"},
    }
    models = parse_config(settings, {}).models
    assert [models[n].image_tokens for n in ("duo", "tight", "local")] == [48_169, 2_833, 5_000]
    settings["models"]["tight"]["image_tokens"] = -1
    with pytest.raises(ConfigError, match=r"models\.tight\.image_tokens must not be negative"):
        parse_config(settings, {})


PNG = "data:image/png;base64,iVBORw0KGgo="
MAX_TOKENS = 6


def _asks() -> dict[str, tuple[str, dict[str, Any]]]:
    """Each surface's request for one question about one picture."""
    question = "What is in this picture?"
    source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    parts = {
        "chat": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": PNG}},
        ],
        "responses": [
            {"type": "input_text", "text": question},
            {"type": "input_image", "image_url": PNG},
        ],
        "messages": [{"type": "text", "text": question}, {"type": "image", "source": source}],
    }
    turns = {s: [{"role": "user", "content": p}] for s, p in parts.items()}
    return {
        "chat": ("/chat/completions", {"messages": turns["chat"], "max_tokens": MAX_TOKENS}),
        "responses": ("/responses", {"input": turns["responses"], "max_output_tokens": MAX_TOKENS}),
        "messages": ("/messages", {"messages": turns["messages"], "max_tokens": MAX_TOKENS}),
    }


def _text_tokens(gateway: Gateway, surface: str, body: dict[str, Any]) -> int:
    """The request's prompt count with its images left out (tiktoken's part)."""
    tokens = gateway.app[S.TOKENS]
    if surface == "chat":
        return tokens.count_chat_prompt(body, "o200k_base", image_tokens=0)
    return count_texts(tokens, surface, "o200k_base", body, 0)


@pytest.mark.parametrize("surface", ["chat", "responses", "messages"])
async def test_the_hold_covers_an_image_at_the_models_worst_case(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream, surface: str
) -> None:
    route, ask = _asks()[surface]
    body = {"model": "gpt-4o-mini", **ask}
    # gpt-4o-mini: 150 nano-USD per prompt token, 600 per output token; the image at 48,169
    worst = (_text_tokens(gateway, surface, body) + 48_169) * 150 + MAX_TOKENS * 600
    _, _, secret = await api.funded_team_key(f"{(worst - 1) / 1e9:.9f}")
    headers = {"Authorization": f"Bearer {secret}", "anthropic-version": "2023-06-01"}
    async with http.post(gateway.v1 + route, json=body, headers=headers) as resp:
        assert resp.status == 429
        assert resp.headers["x-modelbridge-error-code"] == "insufficient_quota"
    assert fake.requests == []  # refused before the provider
    _, _, secret = await api.funded_team_key(f"{worst / 1e9:.9f}")
    headers["Authorization"] = f"Bearer {secret}"
    async with http.post(gateway.v1 + route, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert len(fake.requests) == 1

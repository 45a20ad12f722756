"""Configuration: parsed once into frozen dataclasses; env overrides; unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

BASE = {
    "upstreams": {
        "openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"}
    },
    "models": {"m": {"upstream": "openai", "input_per_mtok": 0.15, "output_per_mtok": 0.6}},
}


def test_repository_config_loads() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "config.yaml")
    assert config.server.port == 8080 and config.server.workers == 1
    mini = config.models["gpt-4o-mini"]
    assert (mini.prices.input, mini.prices.output, mini.prices.cached_input) == (150, 600, 75)
    assert config.plans["pro"].included_usage_per_seat == 5_000_000_000
    assert config.metrics.team_labels is False


def test_env_overrides_every_section() -> None:
    env = {
        "MODELBRIDGE_SERVER_PORT": "9000",
        "MODELBRIDGE_SERVER_WORKERS": "2",
        "MODELBRIDGE_SMTP_HOST": "mail.local",
        "MODELBRIDGE_SMTP_FROM": "Ops <ops@example.com>",
        "MODELBRIDGE_METRICS_TEAM_LABELS": "true",
        "MODELBRIDGE_UPSTREAMS_OPENAI_BASE_URL": "http://proxy.local/v1",
        "MODELBRIDGE_MODELS_M_MAX_OUTPUT_TOKENS": "77",
    }
    config = parse_config(BASE, env)
    assert (config.server.port, config.server.workers) == (9000, 2)
    assert (config.smtp.host, config.smtp.from_addr) == ("mail.local", "Ops <ops@example.com>")
    assert config.metrics.team_labels is True
    assert config.upstreams["openai"].base_url == "http://proxy.local/v1"
    assert config.models["m"].max_output_tokens == 77


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**BASE, "sever": {}}, "unknown config keys: sever"),
        ({**BASE, "server": {"prot": 1}}, "unknown keys in server: prot"),
        ({**BASE, "models": {"m": {"upstream": "openai", "input_per_mtok": "0.0001"}}}, "models.m"),
        ({**BASE, "models": {"m": {"upstream": "nope"}}}, "no upstream named 'nope'"),
        (
            {**BASE, "models": {"m": {"upstream": "openai", "colour": 1}}},
            "unknown keys in models.m: colour",
        ),
        ({**BASE, "server": {"port": "eighty"}}, "server.port"),
        ({**BASE, "server": {"workers": 0}}, "server.workers"),
        ({**BASE, "plans": {"p": {"seat_price": "1.0000000001"}}}, "plans.p"),
        (
            {**BASE, "upstreams": {"x": {"base_url": "u", "apikey": "k"}}},
            "unknown keys in upstreams.x: apikey",
        ),
    ],
)
def test_bad_config_stops_the_start_naming_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, {})


def test_price_with_more_than_three_decimals_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="whole number of nano-dollars"):
        parse_config(
            {**BASE, "models": {"m": {"upstream": "openai", "input_per_mtok": 0.1505}}}, {}
        )


def test_config_is_frozen() -> None:
    config = parse_config(BASE, {})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_missing_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")

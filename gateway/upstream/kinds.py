"""The kinds of upstream (``upstreams.<name>.kind``): a provider is one module and one line here."""

from __future__ import annotations

from gateway.config import ConfigError, UpstreamConfig
from gateway.upstream.anthropic import AnthropicProvider
from gateway.upstream.azure import AzureProvider
from gateway.upstream.openai import OpenAIProvider
from gateway.upstream.provider import Provider

KINDS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "azure": AzureProvider,
}


def provider_for(config: UpstreamConfig) -> Provider:
    """The provider of one configured upstream (raises :class:`ConfigError` when unsuited)."""
    cls = KINDS.get(config.kind)
    if cls is None:
        known = ", ".join(sorted(KINDS))
        raise ConfigError(f"upstreams.{config.name}.kind: {config.kind!r} is not one of {known}")
    provider = cls(config)
    provider.check()
    return provider

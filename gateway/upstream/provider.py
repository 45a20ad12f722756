"""What every kind of upstream provides: its URL paths, its fixed headers, the protocol it speaks.

A :class:`Provider` is made once per configured upstream (``upstreams.<name>``). The base class is
an OpenAI-compatible server (kind ``openai``); each other kind is a subclass in a module of its
own, registered in :mod:`gateway.upstream.kinds`. Translating between protocols is not a
provider's business: it says which protocol it speaks (``protocol``) and the proxy translates
with :mod:`policies.translate`.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import ConfigError, UpstreamConfig

OPENAI = "openai"  # Chat Completions, Completions, Embeddings, Responses
ANTHROPIC = "anthropic"  # Messages


class Provider:
    kind = "openai"
    protocol = OPENAI
    routes: frozenset[str] = frozenset(
        {"/chat/completions", "/completions", "/embeddings", "/responses"}
    )
    forwarded_headers: tuple[str, ...] = ()  # client request headers that travel upstream

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")

    def headers(self) -> dict[str, str]:
        """The headers sent with every request (the upstream's key among them)."""
        headers = {"Content-Type": "application/json", "User-Agent": "modelbridge/0.1"}
        key = self.config.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def path(self, route: str, upstream_model: str) -> str:
        """The URL path (after ``base_url``) of ``route`` (``/chat/completions``...)."""
        return route

    def supports(self, route: str) -> bool:
        return route in self.routes

    def forward(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        """The client's headers that travel upstream with one request."""
        out = {}
        for name in self.forwarded_headers:
            value = client_headers.get(name)
            if value:
                out[name] = value
        return out

    def check(self) -> None:
        """Raise :class:`ConfigError` when the upstream's config does not suit this kind."""
        if self.config.api_version:
            raise ConfigError(f"upstreams.{self.config.name}.api_version: only for azure")

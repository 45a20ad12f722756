"""Kind ``anthropic``: Anthropic's native Messages API.

``base_url`` ends at the version (``https://api.anthropic.com/v1``) and the gateway appends
``/messages`` (``/messages/count_tokens``). The key travels as ``x-api-key``, with
``anthropic-version: 2023-06-01`` unless the client sent its own; the client's
``anthropic-version`` and ``anthropic-beta`` headers travel upstream unchanged.
"""

from __future__ import annotations

from gateway.upstream.provider import ANTHROPIC, Provider

VERSION = "2023-06-01"


class AnthropicProvider(Provider):
    kind = "anthropic"
    protocol = ANTHROPIC
    routes = frozenset({"/messages", "/messages/count_tokens"})
    forwarded_headers = ("anthropic-version", "anthropic-beta")

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "modelbridge/0.1"}
        headers["anthropic-version"] = VERSION
        key = self.config.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

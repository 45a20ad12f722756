"""Kind ``openai``: any OpenAI-compatible server (the default kind).

``base_url`` ends at the version (``https://api.openai.com/v1``); the key goes as
``Authorization: Bearer``; every OpenAI route is served as the client named it.
"""

from __future__ import annotations

from gateway.upstream.provider import Provider


class OpenAIProvider(Provider):
    kind = "openai"

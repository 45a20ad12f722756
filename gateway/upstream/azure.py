"""Kind ``azure``: Azure OpenAI.

``base_url`` is the resource's ``https://NAME.openai.azure.com/openai``; a model's
``upstream_model`` is the deployment name: ``{base_url}/deployments/{deployment}/chat/completions
?api-version={api_version}`` (likewise ``/completions``, ``/embeddings``); the Responses API is
``{base_url}/responses?api-version=...`` with the deployment as the body's ``model``. The key
travels as ``api-key``. Azure answers in OpenAI's protocol (plus content-filter fields).
"""

from __future__ import annotations

from urllib.parse import quote

from gateway.config import ConfigError
from gateway.upstream.provider import Provider


class AzureProvider(Provider):
    kind = "azure"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "modelbridge/0.1"}
        key = self.config.api_key()
        if key:
            headers["api-key"] = key
        return headers

    def path(self, route: str, upstream_model: str) -> str:
        version = "?api-version=" + quote(self.config.api_version, safe="")
        if route == "/responses":
            return route + version
        return f"/deployments/{quote(upstream_model, safe='')}{route}{version}"

    def check(self) -> None:
        if not self.config.api_version:
            raise ConfigError(f"upstreams.{self.config.name}.api_version is required for azure")

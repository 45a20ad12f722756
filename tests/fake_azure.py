"""A fake Azure OpenAI server: the OpenAI fake behind Azure's paths, key header and errors.

Endpoints: ``POST /openai/deployments/{deployment}/chat/completions``, ``.../completions``,
``.../embeddings`` and ``POST /openai/responses`` (the body's ``model`` names the deployment), each
with a required ``?api-version=`` query parameter (missing or not in ``api_versions``: 404
``Resource not found``). The key travels as ``api-key`` (wrong or missing: 401 ``Access
denied...``); a deployment not in ``deployments`` gets 404 ``DeploymentNotFound``. The body's
``model`` is ignored for chat: answers name the deployment's model (``deployments`` maps
deployment name -> model name). Plain chat answers carry ``prompt_filter_results`` and each
choice ``content_filter_results``; a chat stream starts with Azure's filter-results chunk
(``choices: []``, empty ``id`` and ``model``) before the first OpenAI chunk. Error envelopes are
Azure's: ``{"error": {"code": "429", "message": "Requests to the ... Please retry after 1
second..."}}`` with ``retry-after``, ``{"error": {"code": "DeploymentNotFound", ...}}``, and for
400 the content-filter error with ``innererror``.

Behaviours, the queue, markers and the recorded requests are those of ``tests.fake_upstream``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from tests.fake_upstream import _BODY, FakeUpstream, _Reply

DEFAULT_DEPLOYMENTS: Mapping[str, str] = {"gpt4o-prod": "gpt-4o-2024-08-06", "mini": "gpt-4o-mini"}
API_VERSIONS = ("2024-10-21", "2025-01-01-preview", "preview")
_FILTERS = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
    "valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)
NO_DEPLOYMENT = (
    "The API deployment for this resource does not exist. If you created the deployment within "
    "the last 5 minutes, please wait a moment and try again."
)
CONTENT_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy. Please modify your prompt and retry."
)


def azure_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


class FakeAzure(FakeUpstream):
    """In-process fake Azure OpenAI resource."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        deployments: Mapping[str, str] = DEFAULT_DEPLOYMENTS,
        api_versions: Sequence[str] = API_VERSIONS,
        record: bool = True,
    ) -> None:
        super().__init__(api_key=None, record=record)  # Azure's key check is ours, not Bearer
        self.azure_key = api_key
        self.deployments = dict(deployments)
        self.api_versions = tuple(api_versions)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        base = "/openai/deployments/{deployment}"
        app.router.add_post(base + "/chat/completions", self._azure)
        app.router.add_post(base + "/completions", self._azure)
        app.router.add_post(base + "/embeddings", self._azure)
        app.router.add_post("/openai/responses", self._azure)
        app.router.add_route("*", "/{tail:.*}", self._azure_not_found)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner, self._stopping = runner, False
        bound_host, bound_port = runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}/openai"
        return self.base_url

    @property
    def endpoint(self) -> str:
        """The resource endpoint (what ``AsyncAzureOpenAI(azure_endpoint=...)`` takes)."""
        return self.base_url.removesuffix("/openai")

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        if self.azure_key is not None and request.headers.get("api-key") != self.azure_key:
            return azure_error(401, "401", ACCESS_DENIED)
        if request.query.get("api-version") not in self.api_versions:
            return azure_error(404, "404", "Resource not found")
        body = request[_BODY]
        responses = request.path == "/openai/responses"
        deployment = body.get("model") if responses and isinstance(body, dict) else None
        deployment = deployment or request.match_info.get("deployment")
        if deployment not in self.deployments:
            return azure_error(404, "DeploymentNotFound", NO_DEPLOYMENT)
        if isinstance(body, dict):
            body["model"] = self.deployments[str(deployment)]
        try:
            if responses:
                return await self._responses(request)
            if request.path.endswith("/embeddings"):
                return await self._embeddings(request)
            return await self._generate(request)
        except _Reply as reply:
            raise _Reply(self._azure_shape(reply.response)) from None

    def _azure_shape(self, resp: web.StreamResponse) -> web.StreamResponse:
        """OpenAI-shaped validation errors of the base fake, in Azure's shape (same status)."""
        if isinstance(resp, web.Response) and resp.status == 400 and resp.body is not None:
            err = orjson.loads(bytes(resp.body)).get("error", {})  # type: ignore[arg-type]
            if err.get("type") == "invalid_request_error":
                return azure_error(400, "BadRequest", str(err.get("message")))
        return resp

    def error_for(self, status: int) -> web.Response:
        if status == 400:
            inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": _FILTERS}
            err = {"message": CONTENT_FILTERED, "type": None, "param": "prompt"}
            err |= {"code": "content_filter", "status": 400, "innererror": inner}
            return web.Response(
                body=orjson.dumps({"error": err}), status=400, content_type="application/json"
            )
        if status == 429:
            message = (
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
                f"{self.api_versions[0]} have exceeded token rate limit of your current OpenAI S0 "
                "pricing tier. Please retry after 1 second."
            )
            return azure_error(429, "429", message, {"retry-after": "1"})
        if status == 401:
            return azure_error(401, "401", ACCESS_DENIED)
        if status == 404:
            return azure_error(404, "DeploymentNotFound", NO_DEPLOYMENT)
        message = "The server had an error processing your request. Sorry about that!"
        return azure_error(status, "InternalServerError", message)

    def decorate(self, body: dict[str, Any]) -> dict[str, Any]:
        filters = [{"prompt_index": 0, "content_filter_results": _FILTERS}]
        for choice in body.get("choices") or []:
            choice["content_filter_results"] = _FILTERS
        return body | {"prompt_filter_results": filters}

    def stream_prefix(self) -> list[bytes]:
        filters = [{"prompt_index": 0, "content_filter_results": _FILTERS}]
        chunk = {"choices": [], "created": 0, "id": "", "model": "", "object": ""}
        return [orjson.dumps(chunk | {"prompt_filter_results": filters})]

    async def _azure_not_found(self, request: web.Request) -> web.StreamResponse:
        return azure_error(404, "404", "Resource not found")

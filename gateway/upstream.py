"""The providers: one pooled ``aiohttp.ClientSession`` per configured upstream.

``Upstreams.send(request)`` is the single seam for provider I/O (tests plug a fake OpenAI server
in through config, nothing else). aiohttp's exceptions are translated here, and only here:
connection failures become :class:`UpstreamFailed` (502) and timeouts :class:`UpstreamTimeout`
(504). The client's key never travels upstream; the upstream's key never reaches a client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from gateway.config import Config, UpstreamConfig
from gateway.errors import UpstreamFailed, UpstreamTimeout


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    upstream: str
    path: str  # "/chat/completions"
    body: bytes
    stream: bool = False


class Upstreams:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self._headers: dict[str, Mapping[str, str]] = {}
        self._urls: dict[str, str] = {}

    async def open(self) -> None:
        for name, up in self.config.upstreams.items():
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
            )
            self.sessions[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=up.connect_timeout_s, sock_read=up.timeout_s
                ),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
            self._headers[name] = self._auth_headers(up)
            self._urls[name] = up.base_url.rstrip("/")

    @staticmethod
    def _auth_headers(up: UpstreamConfig) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "modelbridge/0.1"}
        key = up.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()
        self.sessions.clear()

    async def send(self, request: UpstreamRequest) -> aiohttp.ClientResponse:
        """Start the request; the caller reads (or streams) the body and releases the response."""
        session = self.sessions[request.upstream]
        url = self._urls[request.upstream] + request.path
        try:
            return await session.post(
                url, data=request.body, headers=self._headers[request.upstream]
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {request.upstream} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(
                f"upstream {request.upstream} unreachable: {type(exc).__name__}"
            ) from exc

    async def get(self, upstream: str, path: str) -> aiohttp.ClientResponse:
        session = self.sessions[upstream]
        try:
            return await session.get(self._urls[upstream] + path, headers=self._headers[upstream])
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(f"upstream {upstream} unreachable: {type(exc).__name__}") from exc


async def read_body(response: aiohttp.ClientResponse, upstream: str) -> bytes:
    """Read a whole (non-streamed) upstream body, translating failures (the session's
    ``sock_read`` timeout bounds a silent upstream)."""
    try:
        return await response.read()
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {upstream} did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(
            f"upstream {upstream} failed mid-response: {type(exc).__name__}"
        ) from exc

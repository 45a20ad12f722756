"""The providers: per configured upstream, one pooled ``aiohttp.ClientSession`` for streams and
listings, and one lean keep-alive :class:`gateway.upstream.http1.Origin` for the answers read whole.

``Upstreams`` is the single seam for provider I/O (tests plug fake providers in through config,
nothing else): ``send(request)`` starts a call read by aiohttp (a handed-over stream, a
listing), ``encode`` + ``call`` make a plain call, ``encode`` + ``stream`` a lean stream.
What differs between kinds of upstream (URL paths, key headers, the protocol spoken) is each
kind's :class:`gateway.upstream.provider.Provider`, in its own module.
Both clients' exceptions are translated here, and only here: connection failures become
:class:`UpstreamFailed` (502) and timeouts :class:`UpstreamTimeout` (504). The client's key never
travels upstream; the upstream's key never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from gateway.config import Config
from gateway.errors import UpstreamFailed, UpstreamTimeout
from gateway.upstream.http1 import (
    BodySink,
    Origin,
    OriginError,
    OriginTimeout,
    OriginTooLarge,
    Response,
    Streamed,
)
from gateway.upstream.kinds import provider_for
from gateway.upstream.provider import Provider

log = logging.getLogger("modelbridge.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    upstream: str
    path: (
        str  # as made by Upstreams.path: "/chat/completions", "/deployments/d/...?api-version=..."
    )
    body: bytes
    stream: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)  # besides the upstream's own


class Upstreams:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self._headers: dict[str, Mapping[str, str]] = {}
        self._urls: dict[str, str] = {}
        self.origins: dict[str, Origin] = {}
        self.providers: dict[str, Provider] = {
            name: provider_for(up) for name, up in config.upstreams.items()
        }
        self._paths: dict[tuple[str, str, str], str] = {}

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
            self._headers[name] = self.providers[name].headers()
            self._urls[name] = up.base_url.rstrip("/")
            self.origins[name] = Origin(
                up.base_url,
                dict(self._headers[name]),
                connect_timeout=up.connect_timeout_s,
                read_timeout=up.timeout_s,
                max_body_bytes=up.max_response_bytes,
            )

    def path(self, upstream: str, route: str, upstream_model: str) -> str:
        """The URL path of ``route`` for ``upstream_model`` on ``upstream`` (memoized)."""
        key = (upstream, route, upstream_model)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = self.providers[upstream].path(route, upstream_model)
        return path

    async def close(self) -> None:
        for origin in self.origins.values():
            origin.close()
        self.origins.clear()
        for session in self.sessions.values():
            await session.close()
        self.sessions.clear()

    def encode(
        self, upstream: str, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """A plain call's request as :meth:`call` sends it (built ahead of the hold's reply);
        ``headers``: the client's that travel upstream (see ``Provider.forward``)."""
        return self.origins[upstream].encode(path, body, headers)

    async def call(self, upstream: str, data: bytes) -> Response:
        """Send a request made by :meth:`encode`; the provider's whole answer, any status."""
        try:
            return await self.origins[upstream].post(data)
        except OriginTimeout as exc:
            raise _retryable(
                UpstreamTimeout(f"upstream {upstream} did not answer in time")
            ) from exc
        except OriginTooLarge as exc:
            log.warning("upstream %s: %s", upstream, exc)
            raise UpstreamFailed(
                f"upstream {upstream} answered more than {exc.limit} bytes (max_response_bytes)"
            ) from exc
        except OriginError as exc:
            log.warning("upstream %s: %s", upstream, exc)  # the detail stays in the log
            raise _retryable(UpstreamFailed(f"upstream {upstream} unreachable or broken")) from exc

    async def stream(self, upstream: str, data: bytes, sink: BodySink) -> Streamed:
        """Send a request made by :meth:`encode` and return once its answer's head is in (any
        status); the body goes to ``sink`` as it arrives (the lean front's streams)."""
        try:
            return await self.origins[upstream].stream(data, sink)
        except OriginTimeout as exc:
            raise _retryable(
                UpstreamTimeout(f"upstream {upstream} did not answer in time")
            ) from exc
        except OriginError as exc:
            log.warning("upstream %s: %s", upstream, exc)
            raise _retryable(UpstreamFailed(f"upstream {upstream} unreachable or broken")) from exc

    async def send(self, request: UpstreamRequest) -> aiohttp.ClientResponse:
        """Start the request; the caller reads (or streams) the body and releases the response."""
        session = self.sessions[request.upstream]
        url = self._urls[request.upstream] + request.path
        try:
            headers = self._headers[request.upstream]
            if request.headers:
                headers = {**headers, **request.headers}
            return await session.post(url, data=request.body, headers=headers)
        except TimeoutError as exc:
            timeout = UpstreamTimeout(f"upstream {request.upstream} did not answer in time")
            raise _retryable(timeout) from exc
        except aiohttp.ClientError as exc:
            failed = UpstreamFailed(
                f"upstream {request.upstream} unreachable: {type(exc).__name__}"
            )
            raise _retryable(failed) from exc


def _retryable(error: UpstreamFailed) -> UpstreamFailed:
    """A failure before the provider's first byte: routing may try another deployment."""
    error.retryable = True
    return error

"""CSRF protection for the management API when a browser authenticates it with the session
cookie.

Double-submit: the dashboard's pages (and every successful login) set a random, non-HttpOnly
``mb_csrf`` cookie; the dashboard's JavaScript copies it into an ``x-csrf-token`` header on every
state-changing request. A POST/PUT/PATCH/DELETE under ``/api/`` that is authenticated by the
``mb_session`` cookie (no ``Authorization: Bearer`` / ``x-api-key`` header, which scripts and SDKs
use and a browser never adds on its own) must carry that header, equal to the cookie. Another
site can make a browser send the cookies but can neither read them nor add a custom header.

On top of that, for every cookie-style state-changing ``/api/`` request, including signup and
login (which carry no session yet: login CSRF), a browser's ``Origin`` / ``Sec-Fetch-Site`` must
name this site. Clients that send neither header (curl, SDKs) are not affected.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from gateway import state as S
from gateway.api.common import SESSION_COOKIE
from gateway.credentials import bearer
from gateway.errors import Forbidden

CSRF_COOKIE = "mb_csrf"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LOGIN = "/api/auth/login"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def secure_cookies(request: web.Request) -> bool:
    """Cookies get ``Secure`` when the request came over TLS, directly or (as the configured
    ``server.public_url`` says) through a TLS-terminating proxy."""
    public = request.app[S.CONFIG].server.public_url
    return request.secure or public.lower().startswith("https://")


def set_csrf_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    response.set_cookie(
        CSRF_COOKIE,
        token,
        max_age=request.app[S.CONFIG].server.session_ttl_s,
        httponly=False,  # the dashboard's script reads it to echo it in the header
        samesite="Lax",
        secure=secure_cookies(request),
        path="/",
    )


def ensure_csrf_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """Give a page response a CSRF cookie unless the browser has a well-formed one already."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if not _well_formed(current):
        set_csrf_cookie(request, response, new_csrf_token())


def _well_formed(token: str) -> bool:
    return 32 <= len(token) <= 128 and token.isascii()


def _own_hosts(request: web.Request) -> set[str]:
    hosts = {request.host.lower()}
    forwarded = request.headers.get("X-Forwarded-Host")
    if forwarded:
        hosts.add(forwarded.split(",")[0].strip().lower())
    public = request.app[S.CONFIG].server.public_url
    if public:
        hosts.add(urlsplit(public).netloc.lower())
    return hosts


def _check_origin(request: web.Request) -> None:
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise Forbidden("cross-site request refused", code="csrf_failed")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
    if netloc not in _own_hosts(request):
        raise Forbidden("request from another origin refused", code="csrf_failed")


def _check_token(request: web.Request) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    header = request.headers.get(CSRF_HEADER, "")
    if not cookie or not header or not hmac.compare_digest(cookie.encode(), header.encode()):
        raise Forbidden(
            "missing or wrong CSRF token; reload the page and try again", code="csrf_failed"
        )


@web.middleware
async def csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in UNSAFE_METHODS or not request.path.startswith("/api/"):
        return await handler(request)
    if bearer(request) is None:  # a cookie (or no) session: a browser's request
        _check_origin(request)
        if SESSION_COOKIE in request.cookies:
            _check_token(request)
    response = await handler(request)
    if request.path == _LOGIN and response.status == 200:
        set_csrf_cookie(request, response, new_csrf_token())  # a fresh token per session
    return response

"""The team dashboard, served by the gateway itself at ``/``.

A single page written in plain ES modules (``static/js``), no build step and nothing fetched from
anywhere but this origin. Every dashboard path returns the same shell (``static/index.html``); the
script routes on ``location.pathname`` and talks to the JSON API under ``/api``. Pages and assets
carry a strict Content-Security-Policy (no inline script or style), ``X-Frame-Options: DENY`` and
``nosniff``; the page response also hands out the CSRF cookie (:mod:`gateway.api.csrf`).

Two small read-only endpoints live here because only the dashboard needs them: the configured
models (for the model access checkboxes) and the configured plans (for the billing page).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway import state as S
from gateway.api.common import current_user, json_response
from gateway.api.csrf import ensure_csrf_cookie
from gateway.errors import NotFound
from policies.money import format_usd

STATIC_DIR = Path(__file__).resolve().parent / "static"
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: Paths the single page answers (the script shows the right view for each).
PAGE_PATHS = (
    "/",
    "/login",
    "/signup",
    "/me",
    "/teams/new",
    "/teams/{team}",
    "/teams/{team}/{page}",
    "/invite/{token}",
    "/join/{token}",
)


async def page(request: web.Request) -> web.StreamResponse:
    response = web.FileResponse(
        STATIC_DIR / "index.html",
        headers={
            **SECURITY_HEADERS,
            "Content-Type": _TYPES[".html"],
            "Cache-Control": "no-store",
        },
    )
    ensure_csrf_cookie(request, response)
    return response


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["path"]
    path = (STATIC_DIR / name).resolve()
    kind = _TYPES.get(path.suffix)
    if kind is None or not path.is_relative_to(STATIC_DIR) or not path.is_file():
        raise NotFound(f"Unknown route {request.method} {request.path}")
    return web.FileResponse(
        path,
        headers={**SECURITY_HEADERS, "Content-Type": kind, "Cache-Control": "no-cache"},
    )


async def favicon(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/static/icon.svg")


def _per_mtok(nanos_per_token: int | None) -> str | None:
    return None if nanos_per_token is None else format_usd(nanos_per_token * 1_000_000)


async def models(request: web.Request) -> web.Response:
    """The configured model names and prices (for model access settings)."""
    await current_user(request)
    data = [
        {
            "id": m.name,
            "input_per_mtok_usd": _per_mtok(m.prices.input),
            "output_per_mtok_usd": _per_mtok(m.prices.output),
            "cached_input_per_mtok_usd": _per_mtok(m.prices.cached_input),
        }
        for m in request.app[S.CONFIG].models.values()
    ]
    return json_response({"data": data})


async def plans(request: web.Request) -> web.Response:
    """The configured subscription plans (for the billing page)."""
    await current_user(request)
    data = [
        {
            "id": p.name,
            "seat_price_usd": format_usd(p.seat_price),
            "included_usage_per_seat_usd": format_usd(p.included_usage_per_seat),
        }
        for p in request.app[S.CONFIG].plans.values()
    ]
    return json_response({"data": data})


def setup(app: web.Application) -> None:
    for path in PAGE_PATHS:
        app.router.add_get(path, page)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/api/models", models)
    app.router.add_get("/api/plans", plans)

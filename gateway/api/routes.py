"""Registers every management resource module on the app."""

from __future__ import annotations

from aiohttp import web

from gateway.api import admin, billing, invitations, keys, lifecycle, members, teams, usage, users


def setup(app: web.Application) -> None:
    for module in (users, teams, keys, admin, members, invitations, lifecycle, usage, billing):
        app.router.add_routes(module.routes)

"""Registers every management resource module on the app."""

from __future__ import annotations

from aiohttp import web

from gateway.api import admin, keys, teams, users


def setup(app: web.Application) -> None:
    for module in (users, teams, keys, admin):
        app.router.add_routes(module.routes)

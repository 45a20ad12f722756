"""``GET /v1/models`` and ``GET /v1/models/{id}``: the configured models this key may use.

One pipelined Redis round trip checks the key against its account's live key set (a revoked or
expired key gets 401 here too) and reads the account's blocked models; a key's own ``models``
narrow the list further.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway import state as S
from gateway.credentials import bearer
from gateway.errors import AuthenticationFailed, NotFound
from gateway.metering.meter import guarded
from gateway.proxy.keycache import KeyInfo
from policies import keyspace as rk
from policies.limits import parse_key_entry

_CREATED = 1_700_000_000


async def _allowed(request: web.Request) -> tuple[KeyInfo, list[str]]:
    app = request.app
    key = await app[S.KEYS].lookup(bearer(request))
    ak = rk.AccountKeys(key.account)
    for _ in range(2):
        pipe = app[S.REDIS].pipeline(transaction=False)
        pipe.hget(ak.state, "loaded")
        pipe.hget(ak.keys, key.key_id)
        pipe.smembers(ak.blocked(key.blocked_scope))
        loaded, entry, blocked = await guarded(pipe.execute())
        if loaded == "1":
            break
        await guarded(app[S.ACCOUNTS].load(key.account, app[S.CLOCK].now()))
    if entry is None:
        app[S.KEYS].forget(key.key_id)
        raise AuthenticationFailed("Incorrect API key provided.")
    _, controls = parse_key_entry(entry)
    if controls.expires_at is not None and app[S.CLOCK].now() >= controls.expires_at:
        raise AuthenticationFailed("This API key has expired.")
    models = [m for m in app[S.CONFIG].models if m not in blocked]
    if controls.models is not None:
        models = [m for m in models if m in controls.models]
    return key, models


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "modelbridge"}


async def list_models(request: web.Request) -> web.Response:
    _, models = await _allowed(request)
    body = {"object": "list", "data": [_model_object(m) for m in models]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    _, models = await _allowed(request)
    name = request.match_info["model"]
    if name not in models:
        raise NotFound(f"The model '{name}' does not exist.", code="model_not_found", param="model")
    return web.Response(body=orjson.dumps(_model_object(name)), content_type="application/json")

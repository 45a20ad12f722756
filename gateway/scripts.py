"""The Lua scripts of ``policies/lua``, registered once per Redis client and called by SHA
(redis-py's ``Script`` falls back to loading the script when Redis answers NOSCRIPT)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

import policies

LUA_DIR = Path(policies.__file__).resolve().parent / "lua"


def lua_source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self.hold: AsyncScript = redis.register_script(lua_source("hold"))
        self.settle: AsyncScript = redis.register_script(lua_source("settle"))
        self.release: AsyncScript = redis.register_script(lua_source("release"))
        self.load: AsyncScript = redis.register_script(lua_source("load"))

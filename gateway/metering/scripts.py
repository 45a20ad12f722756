"""The Lua scripts of ``policies/lua``, registered once and called by SHA.

The hold, settle and release scripts run on every request: with a :class:`ScriptClient` they go
through that lean pipelined connection; otherwise (and always for ``load``) through redis-py,
whose ``Script`` also falls back to loading the script when Redis answers NOSCRIPT.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

import policies
from gateway.metering.scriptclient import FastScript, ScriptConnection

LUA_DIR = Path(policies.__file__).resolve().parent / "lua"

ScriptCall = Callable[..., Awaitable[Any]]


INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)


def lua_source(name: str, read: Callable[[str], str] | None = None) -> str:
    """A script's source, each ``--#include <part>`` line replaced by ``lua/lib/<part>.lua``:
    code that several scripts run (e.g. clearing expired holds) exists once. ``read`` takes a
    path relative to ``lua/`` (default: this checkout's files)."""
    read = read or (lambda path: (LUA_DIR / path).read_text())
    return INCLUDE.sub(lambda m: read(f"lib/{m.group(1)}.lua").rstrip("\n"), read(f"{name}.lua"))


class Scripts:
    def __init__(self, redis: Redis, fast: ScriptConnection | None = None) -> None:
        def script(name: str) -> ScriptCall:
            source = lua_source(name)
            if fast is not None:
                return FastScript(fast, source)
            return redis.register_script(source)

        self.hold = script("hold")
        self.settle = script("settle")
        self.release = script("release")
        self.load: ScriptCall = redis.register_script(lua_source("load"))
        self.resettle: ScriptCall = redis.register_script(lua_source("resettle"))

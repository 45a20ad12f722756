"""Secrets and who is calling: new API keys, tokens and ids; the bearer credential of a request;
the operator token on ``/admin``. API keys are stored only as their SHA-256 (:func:`hash_secret`);
the proxy's cache of them is :mod:`gateway.proxy.keycache`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web

from gateway.errors import AuthenticationFailed
from policies import key_format


def secret_bytes(secret: str) -> bytes:
    """A secret as received: header bytes that were not UTF-8 come back as they were sent."""
    return secret.encode("utf-8", "surrogateescape")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret_bytes(secret)).digest()


def _credential(value: str | None) -> str | None:
    """A header's credential: printable ASCII, as every secret the gateway issues; anything
    else is no credential (a 401, never an encoding error)."""
    if value and value.isascii() and value.isprintable():
        return value
    return None


def new_api_key() -> str:
    body = "".join(secrets.choice(key_format.BASE62) for _ in range(key_format.BODY_LEN))
    return key_format.format_key(body)


def new_token() -> str:
    """A session, invitation or link token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return _credential(value.strip())
    return _credential(request.headers.get("x-api-key"))


def check_admin(request: web.Request, admin_token: str) -> None:
    """The operator token, in ``Authorization: Bearer`` only (contract section 8)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    token = (_credential(value.strip()) or "") if scheme.lower() == "bearer" else ""
    if not admin_token or not hmac.compare_digest(secret_bytes(token), secret_bytes(admin_token)):
        raise AuthenticationFailed("operator token required", code="invalid_admin_token")

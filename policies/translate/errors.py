"""Error envelopes of each protocol, and the status -> error type tables.

* OpenAI (Chat Completions, Responses): ``{"error": {"message", "type", "param", "code"}}``.
* Anthropic: ``{"type": "error", "error": {"type", "message"}}``; the type follows the status
  (contract section 9), so that the official ``anthropic`` SDK raises its usual exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def anthropic_type(status: int) -> str:
    if status in ANTHROPIC_TYPES:
        return ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def openai_type(status: int) -> str:
    return OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def anthropic_error(status: int, message: str, kind: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind or anthropic_type(status), "message": message}}


def openai_error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    err = {"message": message, "type": openai_type(status), "param": param, "code": code}
    return {"error": err}


def message_of(body: Any) -> str | None:
    """The human message of an error body in either envelope (or a bare string)."""
    if isinstance(body, str):
        return body or None
    if not isinstance(body, Mapping):
        return None
    err = body.get("error")
    if isinstance(err, Mapping) and isinstance(err.get("message"), str):
        return str(err["message"])
    if isinstance(err, str):
        return err
    if isinstance(body.get("message"), str):
        return str(body["message"])
    return None


def to_anthropic(status: int, body: Any) -> dict[str, Any]:
    """An OpenAI-style upstream error, re-enveloped for an Anthropic client."""
    return anthropic_error(status, message_of(body) or f"upstream error (status {status})")


def to_openai(status: int, body: Any, code: str | None = "upstream_error") -> dict[str, Any]:
    """An Anthropic-style upstream error, re-enveloped for an OpenAI client."""
    return openai_error(status, message_of(body) or f"upstream error (status {status})", code)

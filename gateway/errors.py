"""The one error tree of the gateway, rendered in OpenAI's envelope.

::

    GatewayError                       status  error.type             error.code
    ├── InvalidRequest                 400     invalid_request_error  (field errors: param)
    │   ├── RequestTimeout             408     invalid_request_error  request_timeout
    │   ├── PayloadTooLarge            413     invalid_request_error  payload_too_large
    │   └── UnsupportedEncoding        415     invalid_request_error  unsupported_content_encoding
    ├── AuthenticationFailed           401     invalid_request_error  invalid_api_key
    ├── Forbidden                      403     permission_error       (given)
    ├── NotFound                       404     invalid_request_error  (given, e.g. model_not_found)
    ├── Conflict                       409     invalid_request_error  (given)
    ├── Gone                           410     invalid_request_error  (given)
    ├── Refused                        429     insufficient_quota /   (limits of contract §4)
    │                                          rate_limit_error
    ├── RateLimited                    429     rate_limit_error       rate_limited
    ├── UpstreamFailed                 upstream's status / 502        upstream_error
    │   └── UpstreamTimeout            504     upstream_error         upstream_timeout
    ├── StoreUnavailable               503     gateway_unavailable    gateway_unavailable
    └── ClientGone                     499     (not sent: the client left mid-request)

Third-party exceptions (redis, asyncpg, aiohttp client) are translated into this tree in one place
each, with ``raise ... from exc``: :func:`gateway.metering.meter` for Redis,
:mod:`gateway.upstream.upstreams` for the provider. Anything else that escapes a handler is a
bug and becomes a logged 500.
"""

from __future__ import annotations

from collections.abc import Mapping

ERROR_CODE_HEADER = "x-modelbridge-error-code"


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.headers = dict(headers or {})

    def response_headers(self) -> dict[str, str]:
        """The error's headers, with ``x-modelbridge-error-code`` (on every error response)."""
        return {**self.headers, ERROR_CODE_HEADER: self.code or self.type}

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class RequestTimeout(InvalidRequest):
    """A request not received in whole: nothing more of it came for
    ``server.request_read_timeout_s`` (the connection is closed after the answer)."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class UnsupportedEncoding(InvalidRequest):
    status = 415
    code = "unsupported_content_encoding"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Gone(GatewayError):
    status = 410
    type = "invalid_request_error"
    code = "gone"


class Refused(GatewayError):
    """A limit of contract section 4 refused the request (429)."""

    status = 429
    type = "insufficient_quota"

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        super().__init__(message, code=code, headers=headers)
        if code != "insufficient_quota":
            self.type = "rate_limit_error"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class UpstreamFailed(GatewayError):
    upstream_body = b""  # the provider's own error answer, when there is one
    retryable = False  # routing may try another deployment (connect error, timeout, 429, 5xx)
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamFailed):
    status = 504
    code = "upstream_timeout"


class StoreUnavailable(GatewayError):
    status = 503
    type = "gateway_unavailable"
    code = "gateway_unavailable"


class ClientGone(GatewayError):
    """The client closed the connection before its request was read: nothing to answer (499, as
    nginx counts it), nothing to log."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"

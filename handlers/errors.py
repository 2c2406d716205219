"""The relay's errors: one base, a family for each side, each with its code.

Every failure the relay knows about is a :class:`RelayError` carrying the
``code`` the event contract names. :func:`error_response` and
:meth:`RelayError.event` are the only two places that turn one into output:
an HTTP status with a JSON body before a stream starts, an ``error`` event
after it has.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

__all__ = [
    "ClientGone",
    "ConfigError",
    "RelayError",
    "RequestError",
    "StoreUnavailable",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "error_response",
    "redact",
    "server_busy",
    "too_many_streams",
]


class RelayError(Exception):
    """Base of every error the relay reports to its client."""

    code = "internal_error"
    http_status = 500
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
        upstream_status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        if retryable is not None:
            self.retryable = retryable
        self.upstream_status = upstream_status
        # Seconds, for the Retry-After header of an HTTP answer.
        self.retry_after = retry_after

    def event(self) -> dict[str, Any]:
        """The ``error`` event that ends a stream which has already begun."""
        event: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.upstream_status is not None:
            event["status"] = self.upstream_status
        event["retryable"] = self.retryable
        return event


class RequestError(RelayError):
    """The client's request is malformed; nothing was sent upstream."""

    code = "invalid_request"
    http_status = 400


class UpstreamError(RelayError):
    """The model provider failed us."""

    code = "upstream_error"
    http_status = 502


class UpstreamConnectError(UpstreamError):
    """The provider could not be reached at all."""

    code = "upstream_unreachable"
    retryable = True


class UpstreamTimeout(UpstreamError):
    """The provider took longer than a configured timeout."""

    code = "upstream_timeout"
    http_status = 504
    retryable = True


class UpstreamProtocolError(UpstreamError):
    """The provider answered something that is not an OpenAI-style event stream."""

    code = "upstream_protocol"


class UpstreamStatusError(UpstreamError):
    """The provider answered with an HTTP error status; its own message is kept."""

    def __init__(self, status: int, message: str) -> None:
        code, retryable = _STATUS_CODES.get(status, ("upstream_error", status >= 500))
        if status >= 500 and status not in _STATUS_CODES:
            code = "upstream_unavailable"
        super().__init__(message, code=code, retryable=retryable, upstream_status=status)


class StoreUnavailable(RelayError):
    """The shared stream store (Redis) cannot be reached; worth a retry once it is back."""

    code = "store_unavailable"
    http_status = 503
    retryable = True

    def __init__(self, message: str = "the stream store is unreachable; try again shortly") -> None:
        super().__init__(message, retry_after=5)


def server_busy() -> RelayError:
    return RelayError(
        "the server is at its limit of concurrent streams; try again shortly",
        code="server_busy",
        http_status=503,
        retry_after=5,
    )


def too_many_streams(limit: int) -> RelayError:
    return RelayError(
        f"you already have {limit} streams running; wait for one to end",
        code="too_many_streams",
        http_status=429,
        retry_after=5,
    )


class ClientGone(Exception):
    """The downstream client closed its connection; there is no one to tell."""


class ConfigError(ValueError):
    """A setting is missing or has a value the relay cannot use (it stops start-up, never a stream)."""


_STATUS_CODES: dict[int, tuple[str, bool]] = {
    400: ("upstream_bad_request", False),
    401: ("upstream_auth", False),
    402: ("upstream_payment_required", False),
    403: ("upstream_forbidden", False),
    404: ("upstream_not_found", False),
    408: ("upstream_timeout", True),
    413: ("upstream_bad_request", False),
    422: ("upstream_bad_request", False),
    429: ("upstream_rate_limited", True),
}

_HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(error: RelayError) -> web.Response:
    """The JSON answer for an error found before any stream started."""
    body = {"error": {"code": error.code, "message": error.message}}
    response = web.json_response(body, status=error.http_status)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    if error.http_status == 401:
        # RFC 9110 §11.6.1: a 401 names the scheme it wants (RFC 6750 §3 for Bearer).
        response.headers["WWW-Authenticate"] = 'Bearer realm="thinkstream"'
    return response


def http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method…) in the same JSON shape."""
    code = _HTTP_CODES.get(exc.status, "http_error")
    body = {"error": {"code": code, "message": exc.reason}}
    response = web.json_response(body, status=exc.status)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


# Things shaped like API keys (sk-…, including masked ones such as "sk-proj-****abcd").
_KEY_SHAPES = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_*\-]{6,}")


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` or anything shaped like an API key.

    Providers echo keys in their error messages (OpenAI: "Incorrect API key
    provided: sk-proj-****abcd"), and those messages are relayed to clients.
    """
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_SHAPES.sub("[redacted]", text)

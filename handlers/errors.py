"""The relay's errors: one base, a family for each side, each with its code.

Every failure the relay knows about is a :class:`RelayError` carrying the
``code`` the event contract names. :func:`error_response` and
:meth:`RelayError.event` are the only two places that turn one into output:
an HTTP status with a JSON body before a stream starts, an ``error`` event
after it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

__all__ = [
    "ClientGone",
    "ConfigError",
    "ProtocolLog",
    "RelayError",
    "RequestError",
    "StoreUnavailable",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "error_response",
    "excerpt",
    "let_go_of_cancellation",
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
    """The shared stream store (Redis) cannot be reached; worth a retry once it is back.

    ``uncertain``: a write whose reply never came, which the store may have
    carried out all the same.
    """

    code = "store_unavailable"
    http_status = 503
    retryable = True

    def __init__(
        self, message: str = "the stream store is unreachable; try again shortly", *, uncertain: bool = False
    ) -> None:
        super().__init__(message, retry_after=5)
        self.uncertain = uncertain


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


def let_go_of_cancellation(task: asyncio.Future[Any]) -> None:
    """A done callback: take the CancelledError a cancelled task keeps until someone asks for its result.

    Its traceback holds the frames the cancellation passed through, and those
    hold the task (a generation holds its task, so does a timeout): a cycle
    per cancelled task, which only the garbage collector would free, and it
    runs seldom (see handlers/runtime.py).
    """
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.result()


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


# Errors after which the connection cannot carry another request: a body that never came (RFC 9110
# §15.5.9: the server closes a connection it timed out), or one that could not be decoded.
_CLOSING = frozenset({"body_timeout", "unreadable_body"})


def error_response(error: RelayError) -> web.Response:
    """The JSON answer for an error found before any stream started."""
    body = {"error": {"code": error.code, "message": error.message}}
    response = web.json_response(body, status=error.http_status)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    if error.code in _CLOSING:
        response.force_close()
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


class ProtocolLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's connection log (``aiohttp.server``), with a request its parser refused as one line.

    aiohttp answers a request it cannot parse (an over-long URL or header, an
    unknown method, a bare CR, a NUL) with its own plain-text 400 before any
    of the app's code runs, and logs it as an error with a traceback: a line
    of log per garbage request is plenty. Passed to aiohttp as the request
    handler's ``logger``; everything else goes through unchanged.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), None)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            # At most INFO (aiohttp logs a first request's bad method at DEBUG: mostly TLS or scanners).
            self.logger.log(min(level, logging.INFO), f"{msg}: %s %.200r", *args, type(exc).__name__, exc.message)
            return
        super().log(level, msg, *args, **kwargs)


# Things shaped like API keys (sk-…, including masked ones such as "sk-proj-****abcd").
_KEY_SHAPES = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_*\-]{6,}")
# The shortest run of the key's characters that is taken for a piece of it.
_KEY_RUN = 10
# How far past a cut ``excerpt`` looks, so that a key shape the cut would split is still recognised.
_EXCERPT_SLACK = 256


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret``, any run of ten of its characters, or anything shaped like an API key.

    Providers echo keys in their error messages (OpenAI: "Incorrect API key
    provided: sk-proj-****abcd"), whole, masked or cut short, and those
    messages are relayed to clients.
    """
    if secret:
        text = _without_runs_of(secret, text)
    return _KEY_SHAPES.sub("[redacted]", text)


def excerpt(text: str, limit: int, secret: str | None) -> str:
    """The first ``limit`` characters of ``text``, redacted before the cut (a key cut short is not recognised)."""
    return redact(text[: limit + _EXCERPT_SLACK], secret)[:limit]


def _without_runs_of(secret: str, text: str) -> str:
    """``text`` with each stretch made of runs of ten characters of ``secret`` replaced, once."""
    if len(secret) < _KEY_RUN:
        return text.replace(secret, "[redacted]")
    spans: list[tuple[int, int]] = []
    for start in range(len(secret) - _KEY_RUN + 1):
        run = secret[start : start + _KEY_RUN]
        at = text.find(run)
        while at >= 0:
            spans.append((at, at + _KEY_RUN))
            at = text.find(run, at + 1)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    kept = 0  # text[:kept] is in out
    start, end = spans[0]
    for next_start, next_end in spans[1:]:
        if next_start > end:
            out += (text[kept:start], "[redacted]")
            kept, start = end, next_start
        end = max(end, next_end)
    out += (text[kept:start], "[redacted]", text[end:])
    return "".join(out)

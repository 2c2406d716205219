"""Call the provider and yield thinkstream events as its stream arrives.

This is the provider seam: :func:`stream_chat` is an async generator of event
batches. Each batch holds the events one network read completed, so the
writer can send them in one go, with neighbouring text deltas of one kind
merged into one event. aiohttp's exceptions are translated here, and
nowhere else, into the relay's own errors.

A provider that refuses the connection, or answers 429 or 5xx, is tried again
a few times (honouring ``Retry-After``) within the first-byte timeout. Nothing
of the answer exists then: the provider either never got the request or
turned it down, so a retry can neither repeat text nor be billed twice. Once a
response is accepted, nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ..errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    excerpt,
    redact,
)
from .chunks import ChunkTranslator, Event, coalesce
from .sse_decoder import SSEDecoder

__all__ = ["Upstream", "stream_chat"]

logger = logging.getLogger(__name__)

# How much of a provider's error body is read to find its message.
_ERROR_BODY_LIMIT = 64 * 1024
# How long it may take to come.
_ERROR_BODY_WAIT = 2.0


# Waits between attempts: about half a second, then twice as long each time (with jitter), at most this cap.
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one request goes (base URL, key, extra headers) and how the model's content is read."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    # How the content is read for a leading thinking block (see think_tags.THINK_MODES).
    think: str = "auto"
    # The provider's name, for logs.
    name: str = ""

    @property
    def url(self) -> URL:
        """``<base>/chat/completions``, the base URL's query kept (Azure's api-version, a gateway's key)."""
        return endpoint(self.base_url, "chat/completions")

    def request_headers(self) -> dict[str, str]:
        """The provider's own headers, then the relay's, which win."""
        return {
            **provider_headers(self.headers, self.api_key),
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
        }


def provider_headers(headers: Mapping[str, str], api_key: str | None) -> dict[str, str]:
    """What every request to a provider carries: its own headers, and its key (to it alone) when it has one."""
    if api_key:
        return {**headers, "Authorization": f"Bearer {api_key}"}
    return dict(headers)


async def stream_chat(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    payload: dict[str, Any],
    *,
    max_line: int,
    first_byte_timeout: float | None = None,
    idle_timeout: float | None = None,
    retries: int = 0,
    on_retry: Callable[[str], None] | None = None,
) -> AsyncGenerator[list[Event], None]:
    """POST ``payload`` and yield batches of events until the answer is whole.

    Ends normally only when the provider finished its answer, and then the
    last event is ``done`` (without timings, which the caller adds); every
    other end raises an :class:`UpstreamError` subclass.

    ``first_byte_timeout`` bounds the wait from sending the request to the
    first byte of the body; ``idle_timeout`` then bounds each wait for the
    next bytes (keep-alive comments count); time the caller spends on a batch
    does not count. (aiohttp's ``sock_read`` would also cap the wait for the
    response headers, overriding the first-byte timeout.)

    Up to ``retries`` more attempts follow a refused connection, a 429 or a
    5xx, all within the first-byte timeout; ``on_retry`` is told the reason of
    each (``unreachable`` or the status).
    """
    deadline = asyncio.timeout_at(None)
    silence = _Silence(deadline, first_byte_timeout)
    received = False
    body = orjson.dumps(payload)
    translator: ChunkTranslator | None = None
    try:
        async with deadline, await _open(session, upstream, body, silence, retries, on_retry) as response:
            if response.content_type != "text/event-stream":
                raise UpstreamProtocolError(
                    f"the provider answered {response.content_type or 'without a content type'} "
                    f"instead of an event stream: {await _error_message(response, upstream.api_key)}"
                )
            decoder = SSEDecoder(max_line)
            translator = ChunkTranslator(upstream.think, upstream.api_key)
            async for chunk in response.content.iter_any():
                if received:
                    silence.heard()
                else:
                    received = True
                    silence.expect(idle_timeout)
                batch = coalesce(translator.feed(decoder.feed(chunk)))
                if translator.done:
                    # Whatever the caller then does with the last batch, no timeout may cut into it.
                    silence.expect(None)
                    batch.append(translator.done_event())
                    yield batch
                    return
                if batch:
                    silence.paused = True
                    yield batch
                    silence.paused = False
                    silence.heard()
                # Raised only now, so that the events before a failure are relayed first.
                if translator.error is not None:
                    raise translator.error
                if decoder.error is not None:
                    held = _held_back(translator)
                    if held:
                        yield held
                    raise UpstreamProtocolError(str(decoder.error), code="upstream_line_too_long")
            silence.expect(None)
            tail = coalesce(translator.feed(decoder.close()) + translator.close())
            finished = translator.complete and translator.error is None
            if finished:
                tail.append(translator.done_event())
            if tail:
                yield tail
            if translator.error is not None:
                raise translator.error
            if not finished:
                raise UpstreamError(
                    "the provider's stream ended before the answer was finished",
                    code="upstream_incomplete",
                    retryable=True,
                )
    except UpstreamError as exc:
        # The provider's own words are relayed to the client: never with a key in them.
        exc.message = redact(exc.message, upstream.api_key)
        exc.args = (exc.message,)
        raise
    except aiohttp.ClientConnectorDNSError as exc:
        raise UpstreamConnectError(
            f"cannot resolve the provider's host {exc.host!r}: check the base URL", code="upstream_dns"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        reason = exc.strerror or "no address of it took the connection"
        raise UpstreamConnectError(f"cannot connect to the provider at {exc.host}:{exc.port}: {reason}") from None
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamTimeout("timed out connecting to the provider", code="upstream_connect_timeout") from None
    except TimeoutError:
        if received:
            held = _held_back(translator)
            if held:
                yield held
            raise UpstreamTimeout(
                f"the provider sent nothing for {idle_timeout} s (idle timeout)", code="upstream_idle_timeout"
            ) from None
        raise UpstreamTimeout(
            f"the provider sent nothing within {first_byte_timeout} s (first byte timeout)",
            code="upstream_first_byte_timeout",
        ) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        held = _held_back(translator)
        if held:
            yield held
        raise UpstreamError(
            f"the connection to the provider broke: {exc}", code="upstream_disconnected", retryable=True
        ) from None
    except aiohttp.ClientError as exc:
        # Neither its repr nor its text: some (TooManyRedirects) carry the request's headers, the key
        # among them, or its URL, whose query may hold a key too.
        failure = _described(exc)
        logger.warning("upstream request to %s failed: %s", upstream.name or "the provider", failure)
        raise UpstreamError(f"the request to the provider failed: {failure}") from None
    finally:
        silence.cancel()


def _held_back(translator: ChunkTranslator | None) -> list[Event]:
    """The text the think-tag splitter still holds (a possible tag's start), when the stream breaks.

    It was received, so it is relayed before the error, as an in-band error relays it.
    """
    return coalesce(translator.close()) if translator is not None else []


def endpoint(base_url: str, path: str) -> URL:
    """``path`` under the base URL, its query kept."""
    base = URL(base_url)
    return base.with_path(base.path.rstrip("/") + "/" + path, keep_query=True)


def _described(exc: aiohttp.ClientError) -> str:
    """What went wrong with a request, without the URL or headers aiohttp puts in its exceptions' text."""
    if isinstance(exc, aiohttp.TooManyRedirects):
        return "the provider redirected too many times"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__} (HTTP {exc.status})"
    return type(exc).__name__


async def _open(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    body: bytes,
    silence: _Silence,
    retries: int,
    on_retry: Callable[[str], None] | None,
) -> aiohttp.ClientResponse:
    """POST the request until the provider accepts it (a status below 400), or give up.

    Only what cannot have started an answer is retried: a refused connection
    (the request was never sent), 429 and 5xx (the provider turned it down). A
    wait that would end past the first-byte deadline is not begun.
    """
    headers = upstream.request_headers()
    for attempt in range(retries + 1):
        retry_after: float | None = None
        try:
            response = await session.post(upstream.url, data=body, headers=headers)
        except ValueError as exc:
            # aiohttp refuses the request itself (a user:password@ base URL and a key together).
            raise UpstreamError(f"the request to the provider could not be made: {type(exc).__name__}") from None
        except aiohttp.ClientConnectorError as exc:
            # No connection was made, so the request was never sent: refused, or (a name with several
            # addresses) refused on one and unreachable on another. A name that does not resolve, or a
            # TLS failure, will not mend in a second.
            if isinstance(exc, (aiohttp.ClientConnectorDNSError, aiohttp.ClientSSLError)):
                raise
            failure: BaseException = exc
            reason = "unreachable"
        else:
            if response.status < 400:
                return response
            async with response:
                failure = UpstreamStatusError(response.status, await _error_message(response, upstream.api_key))
                retry_after = _retry_after(response.headers.get("Retry-After"))
            if response.status != 429 and response.status < 500:
                raise failure
            reason = str(response.status)
        wait = retry_after if retry_after is not None else _backoff(attempt)
        if attempt == retries or wait >= silence.remaining():
            raise failure
        logger.warning(
            "provider %s: %s; trying again in %.1f s (retry %d of %d)",
            upstream.name or "the provider",
            "could not connect" if reason == "unreachable" else f"HTTP {reason}",
            wait,
            attempt + 1,
            retries,
        )
        await asyncio.sleep(wait)
        # Counted once it happens: a stream cancelled while it waits makes no retry.
        if on_retry is not None:
            on_retry(reason)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _backoff(attempt: int) -> float:
    return min(_BACKOFF_BASE * 2.0**attempt, _BACKOFF_CAP) * random.uniform(0.5, 1.0)


def _retry_after(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, float(when.timestamp()) - time.time())


class _Silence:
    """Expires ``deadline`` once the provider has sent nothing for ``limit`` seconds.

    A read only notes the time; the timer is re-armed when it fires, not per
    read, so that a fast stream pays no timer per chunk. While ``paused`` (the
    caller is handling a batch) silence does not count.
    """

    __slots__ = ("_deadline", "_expiring", "_handle", "_loop", "heard_at", "limit", "paused")

    def __init__(self, deadline: asyncio.Timeout, limit: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = deadline
        self._handle: asyncio.TimerHandle | None = None
        self.limit: float | None = None
        self.paused = False
        self.heard_at = 0.0
        # Expired, but the deadline's cancellation has not reached the task yet.
        self._expiring = False
        self.expect(limit)

    def expect(self, limit: float | None) -> None:
        """From now on, allow ``limit`` seconds of silence (None: any)."""
        self.limit = limit
        self.heard()
        now = self.heard_at
        if limit is None:
            self.cancel()
        elif self._handle is None or self._handle.when() > now + limit:
            self.cancel()
            self._handle = self._loop.call_at(now + limit, self._check)

    def remaining(self) -> float:
        """Seconds of silence still allowed (infinite without a limit)."""
        if self.limit is None:
            return math.inf
        return self.heard_at + self.limit - self._loop.time()

    def heard(self) -> None:
        """The provider spoke (or the caller is done with a batch): silence counts from now."""
        self.heard_at = self._loop.time()
        if self._expiring:
            # Bytes came in the same loop turn as the expiry: the provider was not silent after all.
            self._expiring = False
            self._deadline.reschedule(None)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        limit = self.limit
        if limit is None:
            return
        now = self._loop.time()
        if self.paused:
            self.heard_at = now
        expires = self.heard_at + limit
        if expires <= now:
            if self._deadline.when() is not None or self._deadline.expired():
                return  # The block has ended, or has its own deadline.
            self._expiring = True
            self._deadline.reschedule(now)
        else:
            self._handle = self._loop.call_at(expires, self._check)


async def _error_message(response: aiohttp.ClientResponse, secret: str | None) -> str:
    """The provider's own words, from the JSON error shapes providers use, without ``secret``."""
    raw = b""
    # The whole body (up to the limit), which may come in several reads, but not for long.
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with asyncio.timeout(_ERROR_BODY_WAIT):
            while len(raw) < _ERROR_BODY_LIMIT:
                piece = await response.content.read(_ERROR_BODY_LIMIT - len(raw))
                if not piece:
                    break
                raw += piece
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return excerpt(text, 500, secret) or f"HTTP {response.status} {response.reason or ''}".strip()
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message") or error.get("msg") or error
        if isinstance(error, str) and error:
            return excerpt(error, 2000, secret)
    return excerpt(text, 500, secret)

"""The stream routes: start a generation, follow or resume one, cancel one.

- ``GET /stream?prompt=…`` / ``POST /stream``: validate, start a generation and
  follow it from its first event. A request that carries ``Last-Event-ID``
  (the browser's EventSource reconnecting) resumes that stream instead: a
  reconnect never sends the provider a second request.
- ``GET /stream/{id}``: follow an existing stream, from the start or after
  ``Last-Event-ID`` / ``?last_event_id=``.
- ``POST /stream/{id}/cancel`` and ``DELETE /stream/{id}``: stop it.

Bad input is refused with a JSON error before any stream starts.
"""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web

from ..errors import ClientGone, RelayError, RequestError
from ..keys import client_session_key, config_key, providers_key, streams_key
from ..provider.upstream import Upstream
from ..stores.log import LogGap, StreamLog
from ..streams.generation import Streams, server_shutdown
from ..streams.sinks import open_sink
from .access import client_key, principal
from .chat_request import read_chat_request

__all__ = ["DEMO_ROUTE", "cancel_stream", "resume_stream", "start_stream"]

logger = logging.getLogger(__name__)

# The route name of the embedded demo model's chat endpoint.
DEMO_ROUTE = "demo-chat-completions"
_DEMO_SUFFIX = "/chat/completions"


async def start_stream(request: web.Request) -> web.StreamResponse:
    """``GET /stream?prompt=…`` or ``POST /stream`` with ``{"messages": […]}``."""
    config = request.config_dict[config_key]
    streams = request.config_dict[streams_key]
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    if last_event_id:
        stream_id, after = _parse_last_event_id(last_event_id, None)
        return await _resume(request, streams, stream_id, after)
    chat = await read_chat_request(request, config)
    ndjson = _wants_ndjson(request)
    if not streams.accepting:
        raise server_shutdown()
    upstream = _upstream(request, chat.model)
    # The access middleware names the client of every API request (token, or address via trusted proxies).
    generation = await streams.start(
        request.config_dict[client_session_key], upstream, chat, request[client_key], principal(request)
    )
    # Its generation's first step appends the meta event, so the headers can wait for it.
    return await _follow(request, streams, generation.log, 0, ndjson, events_due=True)


async def resume_stream(request: web.Request) -> web.StreamResponse:
    """``GET /stream/{id}``: the stream's events after ``Last-Event-ID``, then live ones."""
    streams = request.config_dict[streams_key]
    stream_id = request.match_info["id"]
    last = request.headers.get("Last-Event-ID", "").strip() or request.query.get("last_event_id", "").strip()
    after = 0
    if last:
        named, after = _parse_last_event_id(last, stream_id)
        if named != stream_id:
            raise RequestError(
                f"Last-Event-ID {last!r} belongs to another stream than {stream_id!r}", code="invalid_last_event_id"
            )
    return await _resume(request, streams, stream_id, after)


async def cancel_stream(request: web.Request) -> web.Response:
    """``POST /stream/{id}/cancel`` or ``DELETE /stream/{id}``: stop the generation now."""
    streams = request.config_dict[streams_key]
    stream_id = request.match_info["id"]
    if await streams.open(stream_id, principal(request)) is None:
        raise _not_found(stream_id)
    stopped = await streams.cancel(stream_id)
    return web.json_response({"stream": stream_id, "cancelled": stopped})


async def _resume(request: web.Request, streams: Streams, stream_id: str, after: int) -> web.StreamResponse:
    ndjson = _wants_ndjson(request)
    # A stream started with an access token is another token's business only as far as a 404.
    log = await streams.open(stream_id, principal(request))
    if log is None:
        raise _not_found(stream_id)
    try:
        # Only a check (one event at most): the reader reads them again as it sends them.
        events, finished = await log.read(after, max_bytes=0)
    except LogGap:
        raise RelayError(
            "the events after that id are no longer kept; start a new stream",
            code="resume_gap",
            http_status=410,
        ) from None
    except ValueError:
        raise RequestError(
            f"stream {stream_id!r} has not reached event {after}", code="invalid_last_event_id"
        ) from None
    if finished and events is None:
        # Nothing more will ever come: 204 tells an EventSource to stop reconnecting.
        return web.Response(status=204)
    streams.metrics.resumes.inc()
    return await _follow(request, streams, log, after, ndjson, events_due=events is not None)


async def _follow(
    request: web.Request, streams: Streams, log: StreamLog, after: int, ndjson: bool, *, events_due: bool
) -> web.StreamResponse:
    """Send the log's events after ``after`` to this connection until the stream ends."""
    config = request.config_dict[config_key]
    # Before the response starts, so that a store that cannot be reached is still a JSON 503.
    elsewhere = await streams.join(log.stream_id)
    try:
        sink = await open_sink(
            request,
            ndjson=ndjson,
            stream_id=log.stream_id,
            retry_ms=config.retry_ms,
            keepalive=config.keepalive,
            stall_timeout=config.stall_timeout,
        )
        reader = streams.attach(log.stream_id, sink)
        try:
            if not events_due:
                # Nothing to send yet: the client learns at once that it is connected.
                await sink.send_headers()
            await reader.follow(log, after)
        except ClientGone:
            pass
        except LogGap:
            # This reader fell further behind than the stream's buffer reaches.
            error = RelayError("this connection fell too far behind; the events it missed are gone", code="resume_gap")
            with contextlib.suppress(ClientGone):
                await sink.send(error.event())
        except RelayError as exc:
            # This connection ends, not the stream (it runs in another process, which goes on): this
            # process is shutting down, or the store failed. Not in the log, so with no id; the client
            # resumes from the last id it has.
            event = exc.event()
            event["resume"] = True
            with contextlib.suppress(ClientGone):
                await sink.send(event)
        except Exception:
            # The response has begun, so the JSON error answer is no longer possible: an error event instead.
            logger.exception("sending stream %s to a client failed", log.stream_id)
            error = RelayError("the relay failed unexpectedly; see the server log")
            with contextlib.suppress(ClientGone):
                await sink.send(error.event())
        finally:
            streams.detach(reader)
            await sink.close()
    finally:
        if elsewhere:
            await streams.leave(log.stream_id)
    return sink.response


def _parse_last_event_id(value: str, default_stream: str | None) -> tuple[str, int]:
    """``<stream-id>:<seq>``, or a bare ``<seq>`` when the stream is already known."""
    stream_id, colon, seq = value.rpartition(":")
    if not colon:
        stream_id = default_stream or ""
    if stream_id and seq.isascii() and seq.isdigit():
        # Past 4,300 digits Python refuses to read a number at all (ValueError).
        with contextlib.suppress(ValueError):
            return stream_id, int(seq)
    raise RequestError(
        f"Last-Event-ID must look like '<stream-id>:<seq>', not {value[:100]!r}", code="invalid_last_event_id"
    )


def _not_found(stream_id: str) -> RelayError:
    return RelayError(
        f"no stream {stream_id!r}: it never existed or has expired; start a new one",
        code="stream_not_found",
        http_status=404,
    )


def _wants_ndjson(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is None:
        return "application/x-ndjson" in request.headers.get("Accept", "")
    if fmt not in ("sse", "ndjson"):
        raise RequestError("format must be 'sse' or 'ndjson'", code="invalid_parameter")
    return fmt == "ndjson"


def _upstream(request: web.Request, model: str) -> Upstream:
    """The model's provider (chat_request has checked that one serves it), or else the demo."""
    upstream = request.config_dict[providers_key].upstream(model)
    if upstream is not None:
        return upstream
    return Upstream(_demo_base_url(request), name="demo")


def _demo_base_url(request: web.Request) -> str:
    """This very server's demo model, reached over loopback HTTP like any provider.

    The socket the request came in on is used rather than the Host header, so
    the relay never calls out through a proxy's public name.
    """
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple):
        raise RelayError("the embedded demo model needs a TCP listener; configure a provider instead")
    host, port = sockname[0], sockname[1]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    path = request.app.router[DEMO_ROUTE].url_for().path
    return f"http://{host}:{port}{path.removesuffix(_DEMO_SUFFIX)}"

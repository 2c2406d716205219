"""Generations: one upstream request each, living apart from the connections that watch it.

A :class:`Generation` reads the provider and appends contract events to its
stream's log; any number of connections (:class:`Reader`) follow that log,
from the start or from a ``Last-Event-ID``. When the last reader leaves, the
upstream request is cancelled after a grace time unless a reader comes back.
A finished stream is kept for a while so late readers can still collect it.

:class:`Streams` owns them all for one application: it starts generations,
counts readers, notices dropped connections (aiohttp tells a GET handler
nothing when its client goes, so one watchdog checks every reader's socket),
expires finished streams, and drains everything at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import re
import secrets
from typing import Any

import aiohttp
import orjson

from ..config import Config
from ..errors import ClientGone, RelayError, UpstreamError, let_go_of_cancellation
from ..metrics import Metrics
from ..provider.upstream import Upstream, stream_chat
from ..routes.chat_request import ChatRequest
from ..stores.log import LogClosed, LogGap, StreamLog, StreamStore
from .sinks import EventSink

__all__ = ["Generation", "Reader", "Streams", "cancelled", "server_shutdown"]

logger = logging.getLogger(__name__)

# What the stream ids the relay makes (secrets.token_urlsafe) look like.
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Seconds with no stream running after which the watchdog collects what the last ones left in cycles.
IDLE_COLLECT = 2.0

# How often the watchdog looks for readers whose connection has closed.
WATCH_INTERVAL = 0.5


def cancelled(message: str = "the stream was cancelled") -> RelayError:
    return RelayError(message, code="cancelled")


def server_shutdown() -> RelayError:
    return RelayError(
        "the server is shutting down; try again shortly",
        code="server_shutdown",
        http_status=503,
        retryable=True,
        retry_after=5,
    )


def encode(event: dict[str, Any]) -> tuple[str, bytes]:
    """An event as the log stores it: its type and its JSON text, made once."""
    return event["type"], orjson.dumps(event)


class Reader:
    """One connection following a stream's log, writing to its sink.

    While it waits for events, the stream's generation (when it runs in this
    process) may write them to the sink itself, without waking it: see
    `Generation._append`. ``after`` is the last event its client was sent.
    """

    __slots__ = ("_stop_reason", "_waiter", "after", "generation", "idle", "sink", "stream_id")

    def __init__(self, stream_id: str, sink: EventSink, generation: Generation | None) -> None:
        self.stream_id = stream_id
        self.sink = sink
        self.generation = generation
        self.after = 0
        # True while it waits for events with nothing left to send.
        self.idle = False
        # Resolved by wake(); a bare future costs less per event than an asyncio.Event.
        self._waiter: asyncio.Future[None] | None = None
        # Why it must stop before the log ends (this process is shutting down).
        self._stop_reason: RelayError | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stop(self, reason: RelayError) -> None:
        """End this connection with ``reason`` once it has sent what it has (the stream goes on elsewhere)."""
        self._stop_reason = reason
        self.wake()

    async def follow(self, log: StreamLog, after: int) -> None:
        """Send the log's events after ``after`` to the sink, a batch at a time, until it finishes.

        Stops early, by raising :class:`ClientGone`, if the client goes away.
        """
        loop = asyncio.get_running_loop()
        send = self.sink.send_events
        # A generation running here wakes its readers itself; any other writer, through the log.
        generation = self.generation
        local = generation is not None and generation.follow(self)
        if not local:
            log.subscribe(self.wake)
        self.after = after
        try:
            while True:
                # Armed before reading, so that an append during the read is not missed.
                waiter = self._waiter
                if waiter is None or waiter.done():
                    waiter = self._waiter = loop.create_future()
                events, finished = await log.read(self.after)
                if events is not None:
                    await send(events)
                    self.after = events.last
                    continue
                if finished:
                    return
                if self.sink.gone:
                    raise ClientGone()
                if self._stop_reason is not None:
                    raise self._stop_reason
                self.idle = True
                try:
                    await waiter
                finally:
                    self.idle = False
        finally:
            self._waiter = None
            if local:
                assert generation is not None
                generation.unfollow(self)
            else:
                log.unsubscribe(self.wake)


class Generation:
    """One upstream request and the log it writes."""

    def __init__(
        self, stream_id: str, model: str, client: str, log: StreamLog, store: StreamStore, grace: float
    ) -> None:
        self.id = stream_id
        self.model = model
        self.client = client
        self.log = log
        self.task: asyncio.Task[None] | None = None
        # Connections following it in this process, and processes elsewhere that have some.
        self.readers = 0
        self._elsewhere = 0
        self._store = store
        self._grace = grace
        # Readers waiting on this generation's events: it sends to them or wakes them.
        self._followers: list[Reader] = []
        self.outcome = "running"
        self._started = False
        self._cancelled = False
        # Writing the log's end, which may wait on the store: a Stop then has nothing left to stop.
        self._ending = False
        self._finished = False
        self._stop_reason: RelayError | None = None
        self._abandon: asyncio.TimerHandle | None = None
        self._abandon_check: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def follow(self, reader: Reader) -> bool:
        """Take on waking ``reader`` when events come; False once the log will not grow any more."""
        if self._finished:
            return False
        self._followers.append(reader)
        return True

    def unfollow(self, reader: Reader) -> None:
        self._followers.remove(reader)

    async def _append(self, events: list[tuple[str, bytes]]) -> None:
        """Log the events, then hand them to the readers waiting for them.

        A reader written to directly gets the events even when the append
        already trimmed them again (a total memory budget smaller than what
        the running streams hold): they were in hand, so it misses nothing
        that a woken reader, reading the log, would find gone.
        """
        appended = await self.log.append(events)
        followers = self._followers
        if not followers:
            return
        caught_up = appended.first - 1
        size = sum([len(data) for _, data in events]) + 64 * len(events)  # framed, roughly
        for reader in followers[:] if len(followers) > 1 else followers:
            # A caught-up reader whose connection takes the bytes at once gets them from
            # here, which spares it a wake-up and a loop turn per event. Any other is woken
            # to send them itself, so a slow client never holds up the generation.
            if reader.idle and reader.after == caught_up and reader.sink.ready(size):
                reader.after = appended.last
                try:
                    await reader.sink.send_events(appended)
                except ClientGone:
                    reader.wake()
            else:
                reader.wake()

    def _wake_followers_at_end(self) -> None:
        """The log is finished: every reader still waiting has its last events to send."""
        self._finished = True
        for reader in self._followers:
            reader.wake()

    def reader_joined(self) -> None:
        """A connection follows this stream: it is no longer abandoned."""
        self.readers += 1
        self._keep()

    def reader_left(self) -> None:
        """A connection stopped following; once no process has one, stop after the grace time."""
        self.readers -= 1
        self._abandon_later()

    def readers_elsewhere(self, count: int) -> None:
        """(:class:`Owner`) ``count`` other processes follow this stream now."""
        self._elsewhere = count
        if count:
            self._keep()
        else:
            self._abandon_later()

    def stop_requested(self) -> None:
        """(:class:`Owner`) Someone, in any process, cancelled the stream."""
        self.stop(cancelled())

    def _keep(self) -> None:
        if self._abandon is not None:
            self._abandon.cancel()
            self._abandon = None

    def _abandon_later(self) -> None:
        if self.readers or self._elsewhere or not self.running or self._abandon is not None:
            return
        if self._grace == 0 and not self._store.shared:
            self._abandoned()
        else:
            self._abandon = asyncio.get_running_loop().call_later(self._grace, self._abandoned)

    def _abandoned(self) -> None:
        self._abandon = None
        if not self._store.shared:
            self.stop(cancelled("every client disconnected"))
        elif self._abandon_check is None:
            # What another process told us may be a second old: ask once more before stopping.
            self._abandon_check = asyncio.create_task(self._stop_unless_read_elsewhere())

    async def _stop_unless_read_elsewhere(self) -> None:
        try:
            elsewhere = await self._store.readers_elsewhere(self.id)
        except RelayError:
            elsewhere = 0  # The store is gone: nobody can be reading through it.
        finally:
            self._abandon_check = None
        self._elsewhere = elsewhere
        if not self.readers and not elsewhere:
            self.stop(cancelled("every client disconnected"))

    def stop(self, reason: RelayError) -> bool:
        """Cancel the upstream request; the log ends with ``reason``. False if already over."""
        if not self.running:
            return False
        if self._stop_reason is None:
            self._stop_reason = reason
        # A task cancelled before its first step would never run its body (and so
        # never finish the log); one that has not started sees the reason on entry.
        # It is cancelled once: a second cancellation (a Stop heard twice) would land in
        # the middle of writing the log's end.
        if self._started and not self._cancelled and not self._ending:
            self._cancelled = True
            assert self.task is not None
            self.task.cancel()
        return True

    async def run(
        self, session: aiohttp.ClientSession, upstream: Upstream, chat: ChatRequest, config: Config, metrics: Metrics
    ) -> None:
        """Read the provider into the log; the log always ends with ``done`` or ``error``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        ttft_ms: float | None = None
        usage: dict[str, int] | None = None
        failure: RelayError | None = None
        answer: list[str] | None = [] if config.log_content else None
        log = self.log
        self._started = True
        try:
            await self._append([encode({"type": "meta", "stream": self.id, "model": self.model})])
            metrics.count_event("meta")
            if self._stop_reason is not None:
                raise asyncio.CancelledError
            events = stream_chat(
                session,
                upstream,
                chat.payload(config.include_usage),
                max_line=config.max_line_bytes,
                first_byte_timeout=config.first_byte_timeout,
                idle_timeout=config.idle_timeout,
                retries=config.upstream_retries,
                on_retry=functools.partial(metrics.count_retry, upstream.name),
            )
            counts = metrics.event_counts
            async with contextlib.aclosing(events):
                async for batch in events:
                    for event in batch:
                        kind = event["type"]
                        counts[kind] = counts.get(kind, 0) + 1
                        if kind == "done":
                            now = loop.time()
                            event["ttft_ms"] = ttft_ms
                            event["duration_ms"] = round((now - started) * 1000, 1)
                            usage = event["usage"]
                        elif ttft_ms is None:
                            ttft_ms = round((loop.time() - started) * 1000, 1)
                        if answer is not None and kind == "content":
                            answer.append(event["text"])
                    await self._append([encode(event) for event in batch])
            self.outcome = "done"
        except asyncio.CancelledError:
            failure = self._stop_reason or cancelled()
            raise
        except LogClosed:
            # Ended elsewhere (taken for dead while this process stalled): its log already has its end.
            self.outcome = "ended_elsewhere"
        except RelayError as exc:
            # Kept past this block, with its traceback it would tie this frame (and the stream) into a cycle.
            failure = exc.with_traceback(None)
        except Exception:
            logger.exception("stream %s failed", self.id)
            failure = RelayError("the relay failed unexpectedly; see the server log")
        finally:
            self._ending = True
            try:
                if failure is not None:
                    self.outcome = failure.code
                    metrics.count_event("error")
                    await self._append([encode(failure.event())])
            except LogClosed:
                pass  # Ended elsewhere meanwhile: the log has its end.
            except RelayError as exc:
                # The store failed to take the end too; a shared one ends the stream for everyone else.
                logger.warning("stream %s: its last event could not be logged: %s", self.id, exc.message)
            finally:
                await log.finish()
                self._wake_followers_at_end()
            duration = loop.time() - started
            metrics.stream_ended(
                self.outcome,
                None if ttft_ms is None else ttft_ms / 1000,
                duration,
                usage,
                upstream=isinstance(failure, UpstreamError),
                status=failure.upstream_status if failure is not None else None,
                provider=upstream.name,
            )
            self._log_end(upstream.name, ttft_ms, duration, usage, chat, answer)

    def _log_end(
        self,
        provider: str,
        ttft_ms: float | None,
        duration: float,
        usage: dict[str, int] | None,
        chat: ChatRequest,
        answer: list[str] | None,
    ) -> None:
        """One structured (logfmt) line per stream; no prompt or answer text unless asked for."""
        if not logger.isEnabledFor(logging.INFO):
            return
        usage = usage or {}
        fields: dict[str, object] = {
            "stream": self.id,
            "model": self.model,
            "provider": provider or None,
            "client": self.client,
            "outcome": self.outcome,
            "ttft_ms": ttft_ms,
            "duration_ms": round(duration * 1000),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "reasoning_tokens": usage.get("reasoning_tokens"),
        }
        if answer is not None:
            fields["prompt"] = chat.messages[-1].get("content")
            fields["answer"] = "".join(answer)
        line = " ".join(f"{name}={_logfmt(value)}" for name, value in fields.items())
        logger.info("stream ended %s", line, extra={"stream": fields})


def _logfmt(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c.isspace() or c in '="\\' or not c.isprintable() for c in text):
        # Lone surrogates (undecodable bytes a client sent, as aiohttp decodes headers) are not UTF-8.
        return orjson.dumps(text.encode("utf-8", "backslashreplace").decode()).decode()
    return text


async def _until_finished(log: StreamLog, after: int = 0) -> None:
    """Wait until ``log``, read from ``after`` on, has its last event (or a reader could not catch up with it)."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    log.subscribe(wake)
    try:
        while True:
            events, finished = await log.read(after)
            if events is not None:
                after = events.last
                continue
            if finished:
                return
            await woken
            woken = loop.create_future()
    except LogGap:
        return
    finally:
        log.unsubscribe(wake)


class Streams:
    """Every stream of one application."""

    def __init__(self, config: Config, store: StreamStore) -> None:
        self.config = config
        self.store = store
        self.metrics = Metrics(lambda: self._running, lambda: len(self._readers))
        self.accepting = True
        self._running = 0
        self._generations: dict[str, Generation] = {}
        self._readers: set[Reader] = set()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # Whether a stream started since the watchdog's last idle collection.
        self._started_since_collect = False
        store.share_metrics(self.metrics.snapshot)

    def __len__(self) -> int:
        """Generations running now."""
        return self._running

    @property
    def reader_count(self) -> int:
        return len(self._readers)

    def get(self, stream_id: str) -> Generation | None:
        return self._generations.get(stream_id)

    async def start(
        self,
        session: aiohttp.ClientSession,
        upstream: Upstream,
        chat: ChatRequest,
        client: str,
        principal: str | None = None,
    ) -> Generation:
        """Create the stream and start its generation, which writes ``meta`` before calling the provider.

        Refused (503, or 429 for one client) when too many generations already
        run, in this process or, with a shared store, in all of them.
        """
        stream_id = secrets.token_urlsafe(12)
        log = await self.store.create(stream_id, client=client, principal=principal)
        generation = Generation(stream_id, chat.model, client, log, self.store, self.config.disconnect_grace)
        self._generations[stream_id] = generation
        self._running += 1
        self._started_since_collect = True
        self.store.watch(stream_id, generation)
        generation.task = asyncio.create_task(self._run(generation, session, upstream, chat))
        generation.task.add_done_callback(let_go_of_cancellation)
        return generation

    async def _run(
        self, generation: Generation, session: aiohttp.ClientSession, upstream: Upstream, chat: ChatRequest
    ) -> None:
        try:
            await generation.run(session, upstream, chat, self.config, self.metrics)
        finally:
            self._running -= 1
            if generation.log.handed_over:
                self._expire(generation.id)  # read from the store from now on, as elsewhere
            else:
                self._expire_later(generation.id)

    async def open(self, stream_id: str, principal: str | None) -> StreamLog | None:
        """The stream's log, if it exists and ``principal`` may read it (None otherwise, as for no stream).

        A generation running here is read from this process's memory; any
        other stream from the store.
        """
        if not _STREAM_ID.fullmatch(stream_id):
            return None  # Not one of ours: no store is asked about it.
        generation = self._generations.get(stream_id)
        log = generation.log if generation is not None else await self.store.get(stream_id)
        if log is None or (log.principal is not None and log.principal != principal):
            return None
        return log

    async def join(self, stream_id: str) -> bool:
        """A connection here starts reading ``stream_id``: True if its generation runs elsewhere.

        A shared store is then told, so that the process running it knows it has a reader here;
        :meth:`leave` when the connection is done.
        """
        if not self.store.shared or stream_id in self._generations:
            return False
        await self.store.reader_joined(stream_id)
        return True

    async def leave(self, stream_id: str) -> None:
        # A registration that cannot be withdrawn runs out by itself.
        with contextlib.suppress(RelayError):
            await self.store.reader_left(stream_id)

    def attach(self, stream_id: str, sink: EventSink) -> Reader:
        """A connection starts following ``stream_id``, writing to ``sink``."""
        generation = self._generations.get(stream_id)
        reader = Reader(stream_id, sink, generation)
        self._readers.add(reader)
        if generation is not None:
            generation.reader_joined()
        elif not self.accepting:
            reader.stop(server_shutdown())
        return reader

    def detach(self, reader: Reader) -> None:
        """A connection stops following; the last one to leave anywhere starts the grace time."""
        self._readers.discard(reader)
        if reader.generation is not None:
            reader.generation.reader_left()

    async def cancel(self, stream_id: str) -> bool:
        """Stop a running generation, in this process or another, and wait until its upstream request is closed."""
        generation = self._generations.get(stream_id)
        if generation is not None:
            if not generation.stop(cancelled()):
                return False
            assert generation.task is not None
            await asyncio.wait([generation.task], timeout=5)
            return True
        if not await self.store.request_cancel(stream_id):
            return False
        log = await self.store.get(stream_id)
        if log is not None:
            elsewhere = await self.join(stream_id)
            try:
                async with asyncio.timeout(5):
                    await _until_finished(log, log.last_known)
            except TimeoutError:
                pass
            finally:
                if elsewhere:
                    await self.leave(stream_id)
        return True

    def _expire_later(self, stream_id: str) -> None:
        loop = asyncio.get_running_loop()
        self._expiry[stream_id] = loop.call_later(self.config.retention, self._expire, stream_id)

    def _expire(self, stream_id: str) -> None:
        self._expiry.pop(stream_id, None)
        self._generations.pop(stream_id, None)
        self.store.discard(stream_id)

    async def watch(self) -> None:
        """Wake readers whose client has gone, and drop those stalled on a write, within about a second."""
        loop = asyncio.get_running_loop()
        stall_timeout = self.config.stall_timeout
        reader: Reader | None = None
        # Since when nothing has run (None: something runs, or nothing ran since the last collection).
        idle_since: float | None = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = loop.time()
            for reader in self._readers:
                if reader.sink.stalled(now, stall_timeout):
                    # The blocked write then fails, and the reader leaves as for any gone client.
                    reader.sink.abort()
                elif reader.sink.gone:
                    reader.wake()
            # Not kept while asleep: the last reader looked at (its connection, its stream) would stay referenced.
            reader = None
            if self._running or self._readers:
                idle_since = None
            elif self._started_since_collect:
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= IDLE_COLLECT:
                    # What a burst of streams left in reference cycles (asyncio's own transports keep
                    # one per connection on Python 3.11, CPython gh-100348) waits for a full collection,
                    # which the raised thresholds (handlers/runtime.py) make rare: with nothing running,
                    # one is cheap, and the memory is reused by the next burst instead of added to.
                    self._started_since_collect = False
                    idle_since = None
                    gc.collect()

    async def drain(self) -> None:
        """Graceful shutdown: refuse new streams, let running ones finish up to the deadline, then end them."""
        self.accepting = False
        self._release_readers_elsewhere()
        tasks = [g.task for g in self._generations.values() if g.running and g.task is not None]
        if not tasks:
            return
        logger.info("waiting up to %g s for %d running stream(s)", self.config.shutdown_timeout, len(tasks))
        await asyncio.wait(tasks, timeout=self.config.shutdown_timeout)
        await self._stop_all(server_shutdown())

    def _release_readers_elsewhere(self) -> None:
        """Connections here that follow streams running in other processes end now, with a retryable error.

        Their generations go on; the clients resume them on a process that is not shutting down.
        """
        for reader in self._readers:
            if reader.generation is None:
                reader.stop(server_shutdown())

    async def close(self) -> None:
        """Application cleanup: stop everything that is left and forget every stream."""
        self.accepting = False
        await self._stop_all(server_shutdown())
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        self._generations.clear()
        await self.store.close()

    def start_watchdog(self) -> None:
        self._watchdog = asyncio.create_task(self.watch())

    async def _stop_all(self, reason: RelayError) -> None:
        stopping = [g.task for g in self._generations.values() if g.stop(reason) and g.task is not None]
        if stopping:
            await asyncio.wait(stopping)

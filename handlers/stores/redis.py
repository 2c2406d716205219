"""The Redis store: one stream space served by any number of processes, on any number of machines.

Each generation's events go to a Redis Stream, numbered by the entry ids
themselves, in one scripted round trip per batch (see
:mod:`handlers.stores.redis_scripts`). The process that runs a generation
also keeps its events in memory and serves its own readers from there, as the
memory store does; readers of streams that run elsewhere wait on Redis
through one blocking reader per process (:class:`_Follower`), never a
connection each.

What a process shares beyond the logs:

- the concurrency limits, as leases on slots that a dead process cannot hold;
- cancellations: a flag on the stream that its owner re-reads every
  heartbeat, and a pub/sub message that only makes it notice sooner;
- readers: each process registers the streams it reads, so that an owner
  cancels an abandoned generation only when no process has a reader;
- liveness: the owner's lease on each running stream; when it lapses (the
  process died), any process that reads the stream ends its log with a
  retryable ``generation_lost`` error, so no reader waits forever.

A Redis that cannot be reached is :class:`~handlers.errors.StoreUnavailable`
(503 before a stream starts, a retryable ``error`` event after); the client
reconnects by itself once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import RelayError, StoreUnavailable, server_busy, too_many_streams
from . import redis_scripts
from .log import (
    EVENT_CODES,
    EVENT_TYPES,
    LAST_KINDS,
    READ_BYTES,
    Events,
    LogClosed,
    LogGap,
    Owner,
    StreamLog,
    StreamStore,
)
from .memory import MemoryStreamLog, MemoryStreamStore

__all__ = ["RedisStreamStore", "connect"]

logger = logging.getLogger(__name__)

# Seconds a process's lease on a running stream (and its registration as a reader) lasts without renewal,
# and how often it renews them: a dead owner's readers hear of it within LEASE + REAP_EVERY. Long enough
# that a heartbeat whose batch times out (5 s) does not lose a live owner its streams.
LEASE = 10.0
HEARTBEAT = 1.0
REAP_EVERY = 1.0
# Seconds between trims of what a process's inbox has brought it.
TRIM_EVERY = 1.0
# How long the shared reader blocks on Redis: well below the client's socket timeout.
BLOCK_MS = 1000
# How long a process's published metrics are kept (it publishes them every heartbeat).
METRICS_TTL = 30.0
# Seconds between attempts to reach a Redis that is down.
_RETRY = 1.0

_SCRIPTS = {
    name: getattr(redis_scripts, name)
    for name in ("APPEND", "CANCEL", "CREATE", "FINISH", "HEARTBEAT", "JOIN", "OPEN", "READ", "READERS", "REAP")
}
# ARGV: P, process, snapshot, ttl_ms, gather (1/0) -> [process, snapshot, ...] of every process whose snapshot
# is current, when asked to gather (a scrape); a heartbeat only publishes.
_SCRIPTS["METRICS"] = """
local P, process, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = P .. ':metrics'
if ARGV[3] ~= '' then
  redis.call('SET', index .. ':' .. process, ARGV[3], 'PX', ttl)
  redis.call('ZADD', index, now + ttl, process)
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
redis.call('PEXPIRE', index, ttl)
local out = {}
if ARGV[5] ~= '1' then return out end
for _, name in ipairs(redis.call('ZRANGE', index, 0, -1)) do
  local data = redis.call('GET', index .. ':' .. name)
  if data then
    out[#out + 1] = name
    out[#out + 1] = data
  end
end
return out
"""
_SCRIPTS["LEAVE"] = "redis.call('ZREM', ARGV[1] .. ':readers:' .. ARGV[2], ARGV[3]) return 1"
# The newest events of each followed stream kept as the inbox brings them.
_CACHED_EVENTS = 256
# Errors that mean Redis is not there (a ConnectionError covers a server still loading its data).
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


# Seconds the client waits for a connection and for an answer (BLOCK_MS stays below the latter).
_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0
# Connections in the pool: the calls go in pipelines, so a few carry them all; the rate limiter
# and the blocking reader take one each while they wait.
_POOL = 32


def connect(url: str) -> aioredis.Redis:
    """A client for ``url``; it connects when first used, so a Redis that is down never stops start-up."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=_POOL,
        timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=_SOCKET_TIMEOUT,
        # One immediate retry on a fresh connection (after a Redis restart the pooled ones are dead),
        # then fail fast: a client gets a retryable error rather than a hang.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        # CLIENT LIST then shows which process holds which connection.
        client_name=f"thinkstream-{socket.gethostname()}-{os.getpid()}",
    )
    return aioredis.Redis.from_pool(pool)


class _Lost(StoreUnavailable):
    """Redis no longer has a stream it had (restarted without persistence, flushed, evicted)."""

    def __init__(self) -> None:
        super().__init__("the stream store lost this stream before it finished; ask again")


def _store_lost() -> bytes:
    return orjson.dumps(_Lost().event())


def _lost() -> bytes:
    error = RelayError(
        "the server that ran this stream stopped before it finished; ask again",
        code="generation_lost",
        retryable=True,
    )
    return orjson.dumps(error.event())


class _Calls:
    """Script calls made in one turn of the event loop go to Redis together, pipelined on one connection.

    One batch is in flight at a time: under load, the calls made while it
    travels form the next one, so that a thousand streams appending cost a
    few round trips, not a thousand connections. The connection is this
    object's own (not the pool's), and no batch carries a timer: a watchdog
    looks once a second for one Redis has left unanswered too long. On the
    hot path every timer and loop turn counts (a deadline per batch cost
    about 10 us of the 100 an append costs).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self._connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in _SCRIPTS.items()}
        self._queue: list[tuple[str, Sequence[Any], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        # When the batch in flight was sent (loop time), and whether the watchdog gave up on it.
        self._sent: float | None = None
        self._overdue = False
        # Whether the batch in flight was (perhaps partly) written to Redis, which may then have run it.
        self._written = False
        self._watchdog: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1)
            sent, task = self._sent, self._task
            if sent is not None and task is not None and loop.time() - sent > _SOCKET_TIMEOUT:
                logger.warning("redis left a batch unanswered for %g s; giving up on it", _SOCKET_TIMEOUT)
                self._overdue = True
                task.cancel()

    def submit(self, name: str, *args: Any) -> asyncio.Future[Any]:
        """Queue a call of script ``name``; the future resolves with its result (or a RelayError)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((name, args, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return future

    async def __call__(self, name: str, *args: Any) -> Any:
        return await self.submit(name, *args)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, future in self._queue:
            future.cancel()
        self._queue.clear()
        await self._connection.disconnect()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                results: list[Any]
                self._sent = loop.time()
                self._written = False
                try:
                    results = await self._execute(batch)
                except asyncio.CancelledError:
                    if not self._overdue:
                        # Closing: no caller may wait forever on a call of the batch in flight.
                        for _, _, future in batch:
                            future.cancel()
                        raise
                    self._overdue = False
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    await self._connection.disconnect(nowait=True)
                    results = [StoreUnavailable(uncertain=True) for _ in batch]
                except _UNREACHABLE as exc:
                    logger.debug("redis is unreachable: %r", exc)
                    await self._connection.disconnect(nowait=True)
                    results = [StoreUnavailable(uncertain=self._written) for _ in batch]
                except Exception as exc:
                    # Refused while connecting (a database or name the server will not take), or a reply
                    # redis-py cannot parse: every call of the batch fails, none waits forever.
                    logger.error("the stream store failed: %r", exc)
                    await self._connection.disconnect(nowait=True)
                    message = f"the stream store failed: {type(exc).__name__}"
                    results = [StoreUnavailable(message, uncertain=self._written) for _ in batch]
                self._sent = None
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None

    async def _execute(self, batch: list[tuple[str, Sequence[Any], asyncio.Future[Any]]]) -> list[Any]:
        results = await self._send([("EVALSHA", self._shas[name], 0, *args) for name, args, _ in batch])
        missing = [i for i, result in enumerate(results) if isinstance(result, redis_errors.NoScriptError)]
        if missing:
            # Redis restarted (or its scripts were flushed): load them and run what failed again.
            await self._send([("SCRIPT", "LOAD", source) for source in _SCRIPTS.values()])
            again = await self._send([("EVALSHA", self._shas[batch[i][0]], 0, *batch[i][1]) for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        for i, result in enumerate(results):
            if isinstance(result, redis_errors.ResponseError):
                # Out of memory, read-only after a failover, busy with a long script: Redis is there
                # but will not do it now.
                logger.error("redis refused script %s: %s", batch[i][0], result)
                results[i] = StoreUnavailable("the stream store refused the request; try again shortly")
        return results

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands in one write and read their replies; an error reply is returned, not raised.

        A connection from before a Redis restart fails on first use, in the write or in the first read:
        the batch goes once more on a fresh one (every script can run twice and tell).
        """
        connection = self._connection
        for attempt in range(2):
            results: list[Any] = []
            try:
                reader = getattr(connection, "_reader", None)
                if reader is not None and (reader.at_eof() or reader.exception() is not None):
                    # Closed or reset meanwhile (Redis restarted, or went away): nothing written to it arrives.
                    await connection.disconnect(nowait=True)
                if not connection.is_connected:
                    await connection.connect()  # type: ignore[no-untyped-call]
                # From here bytes may leave, and Redis may run every whole command that reaches it,
                # even if the write fails partway or no reply comes.
                self._written = True
                await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                for _ in commands:
                    try:
                        results.append(await connection.read_response())
                    except redis_errors.ResponseError as error:
                        results.append(error)
                return results
            except _UNREACHABLE:
                await connection.disconnect(nowait=True)
                if attempt or results:
                    raise
        raise AssertionError("unreachable")


class _Followed:
    """A stream that readers here follow, and its newest events as this process's inbox brought them."""

    __slots__ = ("events", "first", "heard", "valid", "wakers")

    def __init__(self) -> None:
        self.wakers: set[Callable[[], None]] = set()
        # The newest events, contiguous, the first numbered ``first``. Valid while every event
        # appended since has come through the inbox, so that a reader at its end is at the log's end.
        self.events: list[tuple[str, bytes]] = []
        self.first = 0
        self.valid = False
        self.heard = 0.0

    def take(self, first: int, items: list[tuple[str, bytes]], now: float) -> None:
        self.heard = now
        last = self.first + len(self.events) - 1
        if self.valid and self.events and first <= last + 1:
            # Contiguous (or overlapping, after a reconnect): keep what is new.
            self.events += items[last + 1 - first :]
        else:
            self.events, self.first, self.valid = list(items), first, True
        if len(self.events) > _CACHED_EVENTS:
            drop = len(self.events) - _CACHED_EVENTS
            del self.events[:drop]
            self.first += drop

    def read(self, after: int, max_bytes: int) -> tuple[Events | None, bool] | None:
        """The events after ``after`` from what the inbox brought; None when only Redis can tell."""
        events = self.events
        if not self.valid or not events:
            return None
        last = self.first + len(events) - 1
        if not self.first - 1 <= after <= last:
            return None
        if after == last:
            return None, events[-1][0] in LAST_KINDS
        start = after + 1 - self.first
        end, size = start, 0
        while end < len(events) and (end == start or size < max_bytes):
            size += len(events[end][1])
            end += 1
        items = events[start:end]
        return Events(after + 1, items), end == len(events) and items[-1][0] in LAST_KINDS


class _Follower:
    """This process's one blocking reader, for every stream it follows that runs elsewhere.

    Each process has an inbox in Redis (a Redis Stream): appending to a log
    also puts the events in the inbox of every process registered as a
    reader of that stream, in the same script. One ``XREAD BLOCK`` on the
    inbox wakes all the readers here, and hands them the events, so that a
    reader on another process costs no further round trip per event. A
    second apart at most, it also ends the logs of followed streams whose
    owner's lease lapsed, and sends readers of a stream the inbox has been
    quiet about to Redis once, in case a notification was lost.
    """

    def __init__(self, store: RedisStreamStore) -> None:
        self._store = store
        self._streams: dict[str, _Followed] = {}
        self._inbox = store.key("inbox", store.process).encode()
        self._seen = b"0-0"
        self._changed = asyncio.Event()

    def subscribe(self, stream_id: str, wake: Callable[[], None]) -> None:
        followed = self._streams.get(stream_id)
        if followed is None:
            followed = self._streams[stream_id] = _Followed()
            self._changed.set()
        followed.wakers.add(wake)

    def unsubscribe(self, stream_id: str, wake: Callable[[], None]) -> None:
        followed = self._streams.get(stream_id)
        if followed is None:
            return
        followed.wakers.discard(wake)
        if not followed.wakers:
            del self._streams[stream_id]

    def read(self, stream_id: str, after: int, max_bytes: int) -> tuple[Events | None, bool] | None:
        followed = self._streams.get(stream_id)
        return None if followed is None else followed.read(after, max_bytes)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._store.client
        checked = trimmed = loop.time()
        trimmed_to = self._seen
        while True:
            if not self._streams:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                result = await client.xread({self._inbox: self._seen}, count=512, block=BLOCK_MS)
                _cancelled_meanwhile()
            except (redis_errors.RedisError, OSError) as exc:
                logger.warning("the stream store is unreachable: %r", exc)
                for followed in self._streams.values():
                    followed.valid = False
                self._wake(self._streams.values())  # Their reads fail too, and they tell their clients.
                await asyncio.sleep(_RETRY)
                continue
            now = loop.time()
            grown: dict[int, _Followed] = {}
            for _, entries in result or ():
                for entry_id, fields in entries:
                    self._seen = entry_id
                    target = self._streams.get(fields[b"s"].decode())
                    if target is not None:
                        target.take(int(fields[b"f"]), _unpack(fields[b"k"], fields[b"l"], fields[b"d"]), now)
                        grown[id(target)] = target
            self._wake(grown.values())
            if self._seen != trimmed_to and now - trimmed >= TRIM_EVERY:
                # What was read is not read again: out of Redis's memory with it, which no byte budget
                # counts (an inbox entry is a whole batch, kept for each process reading the stream).
                trimmed, trimmed_to = now, self._seen
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await client.xtrim(self._inbox, minid=trimmed_to, approximate=False)
            if now - checked >= REAP_EVERY:
                checked = now
                await self._check(now)

    async def _check(self, now: float) -> None:
        """End the logs of followed streams whose owner died; re-read the ones the inbox was quiet about."""
        quiet = [f for f in self._streams.values() if now - f.heard >= REAP_EVERY]
        for followed in quiet:
            followed.valid = False
        self._wake(quiet)
        store = self._store
        try:
            ended = await store.calls(
                "REAP", store.prefix, store.retention_ms, store.globals_ttl_ms, _lost(), *self._streams
            )
        except RelayError:
            return
        for stream_id in ended:
            logger.warning("stream %s lost the process that ran it; its log ends with an error", stream_id.decode())

    @staticmethod
    def _wake(streams: Iterable[_Followed]) -> None:
        for followed in streams:
            for wake in list(followed.wakers):
                wake()


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """A call made for its effect alone: its failure is retrieved (so not logged as never retrieved) and let go."""
    if not future.cancelled():
        future.exception()


def _cancelled_meanwhile() -> None:
    """Raise the cancellation that a read with a timeout may have swallowed.

    redis-py reads with a timeout under ``async_timeout``; a cancellation that
    lands as the timeout fires comes back as a timeout, and the read returns
    None as if nothing had happened. The task still counts the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _unpack(kinds: bytes, lengths: bytes, blob: bytes) -> list[tuple[str, bytes]]:
    """Events as a script returns or notifies them: one digit per type, lengths, the texts back to back."""
    items: list[tuple[str, bytes]] = []
    offset = 0
    for code, length in zip(kinds, lengths.split(), strict=True):
        end = offset + int(length)
        items.append((EVENT_TYPES[code - 48], blob[offset:end]))  # code: an ASCII digit
        offset = end
    return items


class _OwnedLog(StreamLog):
    """The log of a generation running in this process: written to Redis, then kept in memory for its readers here.

    An event reaches this process's readers only once Redis has it, so a
    client that resumes on another process never finds fewer events than it
    was sent.
    """

    def __init__(self, store: RedisStreamStore, mirror: MemoryStreamLog) -> None:
        self.stream_id = mirror.stream_id
        self.principal = mirror.principal
        self._store = store
        self._mirror = mirror
        # The stream as Redis has it, for what this copy cannot tell.
        self._remote = _RemoteLog(store, mirror.stream_id, mirror.principal)
        self._last = 0
        # Redis failed: the stream is ending, and its last events are kept here only.
        self._broken = False
        # An append's reply never came: Redis may hold events this copy has not. Until Redis tells
        # which, no number after ``_last`` is this process's to give (it could name two events).
        self._uncertain = False
        # Redis takes no more events for it; this copy has its last event.
        self._closed = False
        self._ended = False

    @property
    def handed_over(self) -> bool:
        return self._uncertain

    async def append(self, events: Sequence[tuple[str, bytes]]) -> Events:
        if self._closed:
            raise LogClosed(self.stream_id)
        if not events:
            return Events(self._last + 1, [])  # nothing to number, as in memory
        if self._uncertain:
            await self._settle()
        if not self._broken:
            # Types and texts are checked before anything is sent, as the memory log does.
            kinds = "".join([str(EVENT_CODES[kind]) for kind, _ in events])
            blob = b"".join([data for _, data in events])
            lengths = " ".join([str(len(data)) for _, data in events])
            store = self._store
            call = store.calls.submit(
                "APPEND",
                store.prefix,
                self.stream_id,
                store.process,
                self._last,
                store.stream_bytes,
                store.total_bytes,
                store.running_ttl_ms,
                store.retention_ms,
                store.globals_ttl_ms,
                kinds,
                lengths,
                blob,
            )
            try:
                result = await asyncio.shield(call)
            except asyncio.CancelledError:
                # The events may reach Redis all the same: keep this copy in step before giving up.
                try:
                    if await asyncio.shield(call) == b"ok":
                        await self._keep(events)
                except RelayError as exc:
                    self._failed(exc)
                except Exception:
                    pass
                raise
            except RelayError as exc:
                self._failed(exc)
                raise
            if result != b"ok":
                self._closed = True
                if result != b"closed":
                    logger.error("stream %s: the log in redis is not where this process left it", self.stream_id)
                await self._catch_up()
                raise LogClosed(self.stream_id)
        return await self._keep(events)

    def _failed(self, exc: RelayError) -> None:
        """Unreachable, or refusing writes (out of memory, read-only after a failover): the stream ends here.

        Its last events are kept in this process only, unless Redis may have
        taken the batch: then its end waits for Redis to tell what it holds.
        """
        self._broken = True
        self._uncertain = getattr(exc, "uncertain", False)

    async def _settle(self) -> None:
        """After an append whose reply never came: take what Redis holds, so that both copies agree again.

        When Redis cannot tell (still unreachable), raise: the stream is
        then Redis's to end (its reaper does, once this process's lease on
        it runs out), and readers here are sent to read it from Redis.
        """
        try:
            await self._take_from_redis()
        except (_Lost, ValueError):
            # Redis lost the stream, or the events this copy has (restarted without persistence,
            # flushed): it holds nothing to agree with.
            self._uncertain = False
            return
        except (LogGap, RelayError):
            # Unreachable; or Redis has moved past this copy (its byte budget trimmed the batch it
            # took): either way this process cannot tell how the stream goes on.
            raise StoreUnavailable(uncertain=True) from None
        self._broken = self._uncertain = False
        if self._closed:
            raise LogClosed(self.stream_id)

    async def _catch_up(self) -> None:
        """The stream was ended elsewhere: give this process's readers the same end as everyone's.

        When Redis has no such end (it lost the stream: restarted without persistence, flushed,
        evicted), they get a retryable error of their own rather than a silent end.
        """
        with contextlib.suppress(RelayError, LogGap, ValueError):
            await self._take_from_redis()
        if not self._ended:
            await self._keep([("error", _store_lost())])

    async def _take_from_redis(self) -> None:
        """Keep the events Redis holds after this copy's last one."""
        while True:
            events, _ = await self._remote.read(self._last)
            if events is None:
                return
            await self._keep(events.items)

    async def _keep(self, events: Sequence[tuple[str, bytes]]) -> Events:
        appended = await self._mirror.append(events)
        self._last = appended.last
        if events[-1][0] in LAST_KINDS:
            self._ended = True
            # Redis finished the log with its last event.
            self._closed = True
        return appended

    async def finish(self) -> None:
        store = self._store
        if not self._broken and not self._closed:
            self._closed = True
            with contextlib.suppress(RelayError):
                await store.calls(
                    "FINISH", store.prefix, self.stream_id, store.process, store.retention_ms, store.globals_ttl_ms
                )
        store.forget_owner(self.stream_id)
        await self._mirror.finish()

    async def read(self, after: int, max_bytes: int = READ_BYTES) -> tuple[Events | None, bool]:
        if self._uncertain:
            return await self._read_handed_over(after, max_bytes)
        try:
            return await self._mirror.read(after, max_bytes)
        except (LogGap, ValueError):
            # This copy is bounded by this process's memory, and takes an event only once Redis
            # has answered for it: a client handed back by another process may be ahead of it.
            if self._broken:
                raise
            return await self._remote.read(after, max_bytes)

    async def _read_handed_over(self, after: int, max_bytes: int) -> tuple[Events | None, bool]:
        """Confirmed events from this copy; past them, only Redis knows how the stream goes on.

        A reader with nothing more to take from Redis here is sent (with a
        resumable error) to read the stream from Redis, as any other
        process's readers do. This copy never says it is finished: it has
        no end.
        """
        if after < self._last:
            with contextlib.suppress(LogGap, ValueError):
                events, _ = await self._mirror.read(after, max_bytes)
                return events, False
        events, finished = await self._remote.read(after, max_bytes)
        if events is None and not finished:
            raise StoreUnavailable("the stream store failed this stream's writer; resume to follow it")
        return events, finished

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._mirror.subscribe(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        self._mirror.unsubscribe(wake)


class _RemoteLog(StreamLog):
    """A stream as a process that does not run its generation reads it: from Redis."""

    def __init__(self, store: RedisStreamStore, stream_id: str, principal: str | None, last: int = 0) -> None:
        self.stream_id = stream_id
        self.principal = principal
        self.last_known = last
        self._store = store

    async def append(self, events: Sequence[tuple[str, bytes]]) -> Events:
        raise LogClosed(f"stream {self.stream_id} is written by the process that runs it")

    async def finish(self) -> None:
        raise LogClosed(f"stream {self.stream_id} is finished by the process that runs it")

    async def read(self, after: int, max_bytes: int = READ_BYTES) -> tuple[Events | None, bool]:
        store = self._store
        cached = store.follower.read(self.stream_id, after, max_bytes)
        if cached is not None:
            return cached
        result = await store.calls("READ", store.prefix, self.stream_id, after, max_bytes)
        status = result[0]
        if status == b"missing":
            # Found when it was opened: a reader following it gets a retryable error, not a gap of its own.
            raise _Lost()
        if status == b"beyond":
            raise ValueError(f"stream {self.stream_id} has no event {after} yet")
        if status != b"ok":
            raise LogGap(f"events after {after} of stream {self.stream_id} are no longer kept")
        finished, kinds = bool(result[1]), result[2]
        if not kinds:
            return None, finished
        return Events(after + 1, _unpack(kinds, result[3], result[4])), finished

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._store.follower.subscribe(self.stream_id, wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        self._store.follower.unsubscribe(self.stream_id, wake)


class RedisStreamStore(StreamStore):
    """Streams kept in Redis, shared by every process configured with the same Redis and prefix."""

    shared = True

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        stream_bytes: int,
        total_bytes: int,
        max_streams: int,
        client_streams: int,
        retention: float,
    ) -> None:
        self.client = client
        # A hash tag: every key of this relay in one cluster slot, so that one script may touch them all.
        self.prefix = "{" + prefix + "}"
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stream_bytes = stream_bytes
        self.total_bytes = total_bytes
        self.retention_ms = int(retention * 1000)
        # A running stream's keys outlive its owner's last heartbeat by the retention: a resume
        # in that time still finds it, ends it, and replays it to its end.
        self.running_ttl_ms = self.retention_ms + int(LEASE * 1000)
        self.globals_ttl_ms = self.running_ttl_ms + 60_000
        self._max_streams = max_streams
        self._client_streams = client_streams
        self.calls = _Calls(client)
        self.follower = _Follower(self)
        # Logs of the generations running here, in memory for their readers here.
        self._mirror = MemoryStreamStore(stream_bytes=stream_bytes, total_bytes=total_bytes)
        self._owners: dict[str, Owner] = {}
        # Streams running elsewhere that connections here read, and how many connections.
        self._reading: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._metrics: Callable[[], bytes] | None = None

    def key(self, kind: str, stream_id: str) -> str:
        return f"{self.prefix}:{kind}:{stream_id}"

    def start(self) -> None:
        """Start the heartbeat, the cancellation listener and the shared reader (application start-up)."""
        self.calls.start()
        self._loops = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._listen_for_cancels()),
            asyncio.create_task(self.follower.run()),
        ]

    async def close(self) -> None:
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.calls.close()
        await self._mirror.close()

    def spawn(self, coroutine: Any) -> None:
        """Run ``coroutine`` in the background; what it raises is logged, not lost."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("background redis call failed: %r", task.exception())

    async def create(self, stream_id: str, *, client: str, principal: str | None = None) -> StreamLog:
        call = self.calls.submit(
            "CREATE",
            self.prefix,
            stream_id,
            self.process,
            client,
            principal or "",
            self._max_streams,
            self._client_streams,
            int(LEASE * 1000),
            self.running_ttl_ms,
            self.globals_ttl_ms,
        )
        try:
            result = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script runs all the same: a stream made for no one gives back its slots at once,
            # rather than when its lease runs out.
            call.add_done_callback(functools.partial(self._unmake, stream_id))
            raise
        if result == b"busy":
            raise server_busy()
        if result == b"client_busy":
            raise too_many_streams(self._client_streams)
        if result != b"ok":
            raise RelayError(f"stream id {stream_id} is taken; try again")
        mirror = await self._mirror.create(stream_id, client=client, principal=principal)
        return _OwnedLog(self, mirror)

    def _unmake(self, stream_id: str, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None or call.result() != b"ok":
            return
        finish = self.calls.submit(
            "FINISH", self.prefix, stream_id, self.process, self.retention_ms, self.globals_ttl_ms
        )
        finish.add_done_callback(_ignore_outcome)

    async def get(self, stream_id: str) -> StreamLog | None:
        found = await self.calls("OPEN", self.prefix, stream_id, self.retention_ms, self.globals_ttl_ms, _lost())
        if found is None:
            return None
        principal, _state, last = found
        return _RemoteLog(self, stream_id, principal.decode() or None, int(last))

    def discard(self, stream_id: str) -> None:
        # Redis forgets the stream by itself (every key has a TTL); this process, its copy.
        self._mirror.discard(stream_id)

    def watch(self, stream_id: str, owner: Owner) -> None:
        self._owners[stream_id] = owner

    def forget_owner(self, stream_id: str) -> None:
        self._owners.pop(stream_id, None)

    async def request_cancel(self, stream_id: str) -> bool:
        return bool(await self.calls("CANCEL", self.prefix, stream_id))

    async def reader_joined(self, stream_id: str) -> None:
        count = self._reading.get(stream_id, 0)
        self._reading[stream_id] = count + 1
        if count == 0:
            call = self.calls.submit(
                "JOIN", self.prefix, stream_id, self.process, int(LEASE * 1000), self.running_ttl_ms
            )
            try:
                await asyncio.shield(call)
            except BaseException:
                self._left(stream_id)
                # Cancelled, the script runs all the same: unregister then, unless a reader here has come
                # since (a registration left standing would hold the stream's disconnect grace for a lease).
                call.add_done_callback(functools.partial(self._unjoin, stream_id))
                raise

    def _unjoin(self, stream_id: str, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None or stream_id in self._reading:
            return
        self.calls.submit("LEAVE", self.prefix, stream_id, self.process).add_done_callback(_ignore_outcome)

    async def reader_left(self, stream_id: str) -> None:
        if self._left(stream_id):
            await self.calls("LEAVE", self.prefix, stream_id, self.process)

    def _left(self, stream_id: str) -> bool:
        """One reader fewer here; True when it was the last."""
        count = self._reading.get(stream_id, 0) - 1
        if count > 0:
            self._reading[stream_id] = count
            return False
        self._reading.pop(stream_id, None)
        return True

    async def readers_elsewhere(self, stream_id: str) -> int:
        return int(await self.calls("READERS", self.prefix, stream_id))

    async def unavailable(self) -> str | None:
        try:
            async with asyncio.timeout(2):
                await self.client.ping()  # type: ignore[misc]  # redis-py types it as sync or async
        except (TimeoutError, *_UNREACHABLE):
            return "the stream store (Redis) is unreachable"
        except redis_errors.RedisError as exc:
            return f"the stream store (Redis) refused a ping: {exc}"
        return None

    def share_metrics(self, snapshot: Callable[[], bytes]) -> None:
        self._metrics = snapshot

    async def gather_metrics(self, own: bytes) -> Mapping[str, bytes] | None:
        found = await self.calls("METRICS", self.prefix, self.process, own, int(METRICS_TTL * 1000), 1)
        return {found[i].decode(): found[i + 1] for i in range(0, len(found), 2)}

    async def _heartbeat(self) -> None:
        """Renew this process's leases and registrations; hear of cancellations and readers elsewhere."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            if self._metrics is not None:
                # A scrape of any process is then at most a heartbeat behind this one.
                self.spawn(
                    self.calls("METRICS", self.prefix, self.process, self._metrics(), int(METRICS_TTL * 1000), 0)
                )
            owned, reading = list(self._owners), list(self._reading)
            if not owned and not reading:
                continue
            try:
                results = await self.calls(
                    "HEARTBEAT",
                    self.prefix,
                    self.process,
                    int(LEASE * 1000),
                    self.running_ttl_ms,
                    self.globals_ttl_ms,
                    len(owned),
                    *owned,
                    *reading,
                )
            except RelayError:
                continue
            for stream_id, (cancel, readers, closed) in zip(owned, results, strict=True):
                owner = self._owners.get(stream_id)
                if owner is None:
                    continue
                if cancel or closed:
                    owner.stop_requested()
                else:
                    owner.readers_elsewhere(readers)

    async def _listen_for_cancels(self) -> None:
        """Cancellations published by any process: a wake-up only (the heartbeat re-reads the flag)."""
        channel = f"{self.prefix}:cancel"
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=BLOCK_MS / 1000)
                    _cancelled_meanwhile()
                    if message is None or message.get("type") != "message":
                        continue
                    owner = self._owners.get(message["data"].decode())
                    if owner is not None:
                        owner.stop_requested()
            except (redis_errors.RedisError, OSError) as exc:
                logger.debug("cancellation listener: redis is unreachable: %r", exc)
                await asyncio.sleep(_RETRY)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

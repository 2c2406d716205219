"""A stream's event log: written by its generation, read by any number of connections.

Handlers only use the :class:`StreamStore` and :class:`StreamLog` interfaces,
so a shared store (Redis Streams, for several processes) can replace the
in-memory one here without touching them. Events are stored already encoded
as JSON, so each is serialised once however many readers it has.

Memory is bounded twice: each stream keeps at most ``stream_bytes`` of its
newest events, and all streams together at most ``total_bytes``; finished
streams are evicted first, oldest first, and then the oldest events of the
stream that is growing. A reader that asks for an evicted event gets
:class:`LogGap`, never a silent hole; an evicted stream's record stays until
it expires, so that a late reader learns of the gap.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

__all__ = ["EVENT_TYPES", "READ_BYTES", "Events", "LogGap", "MemoryStreamStore", "StreamLog", "StreamStore"]

logger = logging.getLogger(__name__)

# The event contract's types, in the order of their one-byte codes in a log.
EVENT_TYPES = ("meta", "reasoning", "content", "tool_call", "done", "error")
_CODES = {kind: code for code, kind in enumerate(EVENT_TYPES)}

# How much JSON text one read returns (framed, one or two write slices of a sink):
# a reader resuming a long backlog never holds the event loop for long.
READ_BYTES = 48 * 1024

# Bytes an event is charged beyond its JSON text: its end offset (8) and type code (1).
# The containers over-allocate as they grow (by up to an eighth), which this leaves out.
_EVENT_OVERHEAD = 9


class Events:
    """A run of consecutive events of one log, as an append or a read returns them."""

    __slots__ = ("first", "items")

    def __init__(self, first: int, items: Sequence[tuple[str, bytes]]) -> None:
        self.first = first
        # (type, JSON text) of each event, the first numbered ``first``.
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def last(self) -> int:
        """The sequence number of the last event."""
        return self.first + len(self.items) - 1

    def __iter__(self) -> Iterator[tuple[int, str, bytes]]:
        """``(seq, type, json)`` for each event."""
        for seq, (kind, data) in enumerate(self.items, self.first):
            yield seq, kind, data


class LogGap(Exception):
    """The events asked for were evicted to keep memory bounded."""


class StreamLog(ABC):
    """The events of one stream, in order."""

    stream_id: str

    @abstractmethod
    async def append(self, events: Sequence[tuple[str, bytes]]) -> Events:
        """Add ``(type, json)`` events, numbered on from the last one; return them, numbered."""

    @abstractmethod
    async def finish(self) -> None:
        """No event will follow: readers stop when they have read everything."""

    @abstractmethod
    async def read(self, after: int, max_bytes: int = READ_BYTES) -> tuple[Events | None, bool]:
        """The events after sequence number ``after`` (None if there are none yet), and whether the log is finished.

        The events run until their JSON text reaches ``max_bytes`` (so past it
        by at most one event), or to the newest: a reader far behind catches
        up in bounded steps, and a check that something is there
        (``max_bytes=0``) costs one event. A read can stop short of a finished
        log's end, so a reader is done only when it gets None and finished.
        Raises :class:`LogGap` if the first of them is no longer kept, and
        :class:`ValueError` if ``after`` is beyond the last event.
        """

    @abstractmethod
    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever events are appended or the log finishes."""

    @abstractmethod
    def unsubscribe(self, wake: Callable[[], None]) -> None: ...


class StreamStore(ABC):
    """Where logs live, keyed by stream id."""

    @abstractmethod
    def create(self, stream_id: str) -> StreamLog: ...

    @abstractmethod
    def get(self, stream_id: str) -> StreamLog | None:
        """The log, or ``None`` if it never existed or has expired."""

    @abstractmethod
    def discard(self, stream_id: str) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Release everything (application cleanup)."""


class MemoryStreamLog(StreamLog):
    """A log held in this process's memory, packed: thousands of live streams keep one each.

    The kept events' JSON texts sit back to back in one ``bytearray``, their
    end offsets in an ``array`` and their types in a ``bytearray`` of codes:
    9 bytes per event beyond its text (plus what the containers over-allocate
    as they grow, and until they are compacted the entries of up to as many
    dropped events), nothing for the garbage collector
    to walk, and no small allocation kept per event (orjson's output is cut
    down from a 1 KiB buffer, so keeping each one would pin that much heap).
    """

    def __init__(self, store: MemoryStreamStore, stream_id: str) -> None:
        self.stream_id = stream_id
        self._store = store
        self._texts = bytearray()
        # Where each event's text ends, counted from the stream's first byte
        # (self._texts[0] is byte number self._dropped), and its type code.
        # Entries before self._head belong to dropped events: trimming only
        # moves the head, and the arrays are compacted once it passes half.
        self._ends = array("Q")
        self._codes = bytearray()
        self._head = 0
        self._dropped = 0
        self._first = 1  # sequence number of the first kept event
        self._last = 0
        self._finished = False
        self._wakers: set[Callable[[], None]] = set()

    @property
    def size(self) -> int:
        """Bytes this log accounts for."""
        return len(self._texts) + _EVENT_OVERHEAD * (self._last + 1 - self._first)

    async def append(self, events: Sequence[tuple[str, bytes]]) -> Events:
        # Types and texts are taken before anything changes, so a bad event leaves the log as it was.
        new_codes = bytes([_CODES[kind] for kind, _ in events])
        new_texts = b"".join([data for _, data in events])
        ends = self._ends
        start = end = self._dropped + len(self._texts)
        for _, data in events:
            end += len(data)
            ends.append(end)
        self._texts += new_texts
        self._codes += new_codes
        appended = Events(self._last + 1, events)
        self._last += len(events)
        self._store._grew(self, end - start + _EVENT_OVERHEAD * len(events))
        self._wake()
        return appended

    async def finish(self) -> None:
        self._finished = True
        self._store._finished(self)
        self._wake()

    async def read(self, after: int, max_bytes: int = READ_BYTES) -> tuple[Events | None, bool]:
        if after >= self._last:
            if after > self._last:
                raise ValueError(f"stream {self.stream_id} has no event {after} yet")
            return None, self._finished
        if after < self._first - 1:
            raise LogGap(f"events after {after} of stream {self.stream_id} are no longer kept")
        ends, codes, dropped = self._ends, self._codes, self._dropped
        first = self._head + after + 1 - self._first
        start = ends[first - 1] if first > self._head else dropped
        # The last event to return: the first whose text reaches max_bytes, or the newest.
        last = bisect_left(ends, start + max_bytes, first, len(ends) - 1) if max_bytes else first
        # One copy of the whole run, then one per event. The view is released at once:
        # a bytearray with a live view cannot grow.
        with memoryview(self._texts) as texts:
            run = bytes(texts[start - dropped : ends[last] - dropped])
        offset = start
        items = []
        for i in range(first, last + 1):
            end = ends[i]
            items.append((EVENT_TYPES[codes[i]], run[offset - start : end - start]))
            offset = end
        return Events(after + 1, items), self._finished

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.add(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.discard(wake)

    def trim(self, target: int) -> int:
        """Drop the oldest events until at most ``target`` bytes remain; return bytes freed."""
        before = size = self.size
        ends, head, count = self._ends, self._head, len(self._ends)
        start = self._dropped
        drop = head
        while drop < count and size > target:
            size -= ends[drop] - start + _EVENT_OVERHEAD
            start = ends[drop]
            drop += 1
        if drop > head:
            # A bytearray drops its head in place; the arrays only move their head index
            # here, and shift their items once half of them are dropped ones.
            del self._texts[: start - self._dropped]
            self._dropped = start
            self._first += drop - head
            if drop * 2 >= count:
                del ends[:drop]
                del self._codes[:drop]
                drop = 0
            self._head = drop
        return before - self.size

    def _wake(self) -> None:
        for wake in self._wakers:
            wake()


class MemoryStreamStore(StreamStore):
    """Logs in this process, bounded per stream and in total."""

    def __init__(self, *, stream_bytes: int, total_bytes: int) -> None:
        self._stream_bytes = stream_bytes
        self._total_bytes = total_bytes
        self._logs: dict[str, MemoryStreamLog] = {}
        # Finished logs, oldest first: the first to go when memory runs short.
        self._done: OrderedDict[str, MemoryStreamLog] = OrderedDict()
        self.size = 0

    def create(self, stream_id: str) -> MemoryStreamLog:
        log = MemoryStreamLog(self, stream_id)
        self._logs[stream_id] = log
        return log

    def get(self, stream_id: str) -> MemoryStreamLog | None:
        return self._logs.get(stream_id)

    def discard(self, stream_id: str) -> None:
        log = self._logs.pop(stream_id, None)
        if log is not None:
            self._done.pop(stream_id, None)
            self.size -= log.size

    def close(self) -> None:
        self._logs.clear()
        self._done.clear()
        self.size = 0

    def __len__(self) -> int:
        return len(self._logs)

    def _finished(self, log: MemoryStreamLog) -> None:
        if log.stream_id in self._logs:
            self._done[log.stream_id] = log

    def _grew(self, log: MemoryStreamLog, added: int) -> None:
        self.size += added
        if log.size > self._stream_bytes:
            self.size -= log.trim(self._stream_bytes)
        while self.size > self._total_bytes and self._done:
            stream_id, done = self._done.popitem(last=False)
            logger.warning("stream memory is full: dropping the events of finished stream %s early", stream_id)
            # The log itself stays until it expires, so a resume is told of the gap (410),
            # not that the stream never existed (404).
            self.size -= done.trim(0)
        if self.size > self._total_bytes:
            self.size -= log.trim(max(0, log.size - (self.size - self._total_bytes)))

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
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

__all__ = ["EVENT_TYPES", "Events", "LogGap", "MemoryStreamStore", "StreamLog", "StreamStore"]

logger = logging.getLogger(__name__)

# The event contract's types, in the order of their one-byte codes in a log.
EVENT_TYPES = ("meta", "reasoning", "content", "tool_call", "done", "error")
_CODES = {kind: code for code, kind in enumerate(EVENT_TYPES)}

# Bytes an event costs in memory beyond its JSON text: its end offset (8) and type code (1).
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
    async def read(self, after: int) -> tuple[Events | None, bool]:
        """The events after sequence number ``after`` (None if there are none yet), and whether the log is finished.

        Raises :class:`LogGap` if some of them are no longer kept, and
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
    about 9 bytes per event beyond its text, nothing for the garbage collector
    to walk, and no small allocation kept per event (orjson's output is cut
    down from a 1 KiB buffer, so keeping each one would pin that much heap).
    """

    def __init__(self, store: MemoryStreamStore, stream_id: str) -> None:
        self.stream_id = stream_id
        self._store = store
        self._texts = bytearray()
        # Where each kept event's text ends, counted from the stream's first
        # byte; self._texts[0] is byte number self._dropped.
        self._ends = array("Q")
        self._codes = bytearray()
        self._dropped = 0
        self._first = 1  # sequence number of the first kept event
        self._last = 0
        self._finished = False
        self._wakers: set[Callable[[], None]] = set()

    @property
    def size(self) -> int:
        """Bytes this log accounts for."""
        return len(self._texts) + _EVENT_OVERHEAD * len(self._codes)

    async def append(self, events: Sequence[tuple[str, bytes]]) -> Events:
        texts, ends, codes = self._texts, self._ends, self._codes
        start = end = self._dropped + len(texts)
        for kind, data in events:
            texts += data
            end += len(data)
            ends.append(end)
            codes.append(_CODES[kind])
        appended = Events(self._last + 1, events)
        self._last += len(events)
        self._store._grew(self, end - start + _EVENT_OVERHEAD * len(events))
        self._wake()
        return appended

    async def finish(self) -> None:
        self._finished = True
        self._store._finished(self)
        self._wake()

    async def read(self, after: int) -> tuple[Events | None, bool]:
        if after >= self._last:
            if after > self._last:
                raise ValueError(f"stream {self.stream_id} has no event {after} yet")
            return None, self._finished
        if after < self._first - 1:
            raise LogGap(f"events after {after} of stream {self.stream_id} are no longer kept")
        texts, ends, codes, dropped = self._texts, self._ends, self._codes, self._dropped
        skip = after + 1 - self._first
        start = (ends[skip - 1] if skip else dropped) - dropped
        items = []
        for i in range(skip, len(codes)):
            end = ends[i] - dropped
            items.append((EVENT_TYPES[codes[i]], bytes(texts[start:end])))
            start = end
        return Events(after + 1, items), self._finished

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.add(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.discard(wake)

    def trim(self, target: int) -> int:
        """Drop the oldest events until at most ``target`` bytes remain; return bytes freed."""
        before = size = self.size
        ends, count, drop = self._ends, len(self._codes), 0
        while drop < count and size > target:
            start = ends[drop - 1] if drop else self._dropped
            size -= ends[drop] - start + _EVENT_OVERHEAD
            drop += 1
        if drop:
            cut = ends[drop - 1]
            # The bytearray just moves its start; the offsets array moves its items (see the closing note).
            del self._texts[: cut - self._dropped]
            del ends[:drop]
            del self._codes[:drop]
            self._dropped = cut
            self._first += drop
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

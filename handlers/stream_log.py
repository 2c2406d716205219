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
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["Entry", "LogGap", "MemoryStreamStore", "StreamLog", "StreamStore", "entry_size"]

logger = logging.getLogger(__name__)

# Rough bookkeeping cost of one entry beyond its JSON text.
_ENTRY_OVERHEAD = 120

# One event in a log: its sequence number (from 1), type and JSON text. A plain
# tuple of atoms, which the garbage collector stops tracking: thousands of live
# streams keep hundreds of thousands of them, and every full collection would
# otherwise walk them all.
Entry = tuple[int, str, str]


def entry_size(entry: Entry) -> int:
    return len(entry[2]) + _ENTRY_OVERHEAD


class LogGap(Exception):
    """The events asked for were evicted to keep memory bounded."""


class StreamLog(ABC):
    """The events of one stream, in order."""

    stream_id: str

    @abstractmethod
    async def append(self, events: Iterable[tuple[str, str]]) -> None:
        """Add ``(type, json)`` events; numbering continues from the last one."""

    @abstractmethod
    async def finish(self) -> None:
        """No event will follow: readers stop when they have read everything."""

    @abstractmethod
    async def read(self, after: int) -> tuple[list[Entry], bool]:
        """The events after sequence number ``after``, and whether the log is finished.

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
    """A log held in this process's memory."""

    def __init__(self, store: MemoryStreamStore, stream_id: str) -> None:
        self.stream_id = stream_id
        self._store = store
        # Kept events are self._entries[self._head:]; trimming moves the head and
        # compacts now and then, so reads are plain slices.
        self._entries: list[Entry] = []
        self._head = 0
        self._last = 0
        self._finished = False
        self._size = 0
        self._wakers: set[Callable[[], None]] = set()

    @property
    def size(self) -> int:
        """Bytes this log accounts for."""
        return self._size

    async def append(self, events: Iterable[tuple[str, str]]) -> None:
        added = 0
        for kind, data in events:
            self._last += 1
            self._entries.append((self._last, kind, data))
            added += len(data) + _ENTRY_OVERHEAD
        self._size += added
        self._store._grew(self, added)
        self._wake()

    async def finish(self) -> None:
        self._finished = True
        self._store._finished(self)
        self._wake()

    async def read(self, after: int) -> tuple[list[Entry], bool]:
        if after >= self._last:
            if after > self._last:
                raise ValueError(f"stream {self.stream_id} has no event {after} yet")
            return [], self._finished
        entries, head = self._entries, self._head
        if head == len(entries) or entries[head][0] > after + 1:
            raise LogGap(f"events after {after} of stream {self.stream_id} are no longer kept")
        return entries[head + after + 1 - entries[head][0] :], self._finished

    def subscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.add(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        self._wakers.discard(wake)

    def trim(self, target: int) -> int:
        """Drop the oldest events until at most ``target`` bytes remain; return bytes freed."""
        entries, head, freed = self._entries, self._head, 0
        while head < len(entries) and self._size - freed > target:
            freed += entry_size(entries[head])
            head += 1
        if head > len(entries) // 2:
            del entries[:head]
            head = 0
        self._head = head
        self._size -= freed
        return freed

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

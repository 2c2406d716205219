"""The bounded in-memory store: the logs of one process, the embedded default.

Memory is bounded twice: each stream keeps at most ``stream_bytes`` of its
newest events, and all streams together at most ``total_bytes``; finished
streams are evicted first, oldest first, and then the oldest events of the
stream that is growing. A reader that asks for an evicted event gets
:class:`LogGap`, never a silent hole; an evicted stream's record stays until
it expires, so that a late reader learns of the gap.
"""

from __future__ import annotations

import logging
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..errors import server_busy, too_many_streams
from .log import EVENT_CODES, EVENT_TYPES, READ_BYTES, Events, LogGap, StreamLog, StreamStore

__all__ = ["MemoryStreamLog", "MemoryStreamStore"]

logger = logging.getLogger(__name__)

# Bytes an event is charged beyond its JSON text: its end offset (8) and type code (1).
# The containers over-allocate as they grow (by up to an eighth), which this leaves out.
_EVENT_OVERHEAD = 9


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

    def __init__(
        self, store: MemoryStreamStore, stream_id: str, client: str = "", principal: str | None = None
    ) -> None:
        self.stream_id = stream_id
        self.client = client
        self.principal = principal
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
        new_codes = bytes([EVENT_CODES[kind] for kind, _ in events])
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
        if not self._finished:
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
    """Logs in this process, bounded per stream and in total; the streams running now, counted."""

    def __init__(
        self,
        *,
        stream_bytes: int,
        total_bytes: int,
        max_streams: int | None = None,
        client_streams: int | None = None,
    ) -> None:
        self._stream_bytes = stream_bytes
        self._total_bytes = total_bytes
        self._max_streams = max_streams
        self._client_streams = client_streams
        self._logs: dict[str, MemoryStreamLog] = {}
        # Finished logs, oldest first: the first to go when memory runs short.
        self._done: OrderedDict[str, MemoryStreamLog] = OrderedDict()
        # Running streams, in all and per client.
        self._running = 0
        self._per_client: dict[str, int] = {}
        self.size = 0

    async def create(self, stream_id: str, *, client: str = "", principal: str | None = None) -> MemoryStreamLog:
        if self._max_streams is not None and self._running >= self._max_streams:
            raise server_busy()
        if self._client_streams is not None and self._per_client.get(client, 0) >= self._client_streams:
            raise too_many_streams(self._client_streams)
        log = MemoryStreamLog(self, stream_id, client, principal)
        self._logs[stream_id] = log
        self._running += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        return log

    async def get(self, stream_id: str) -> MemoryStreamLog | None:
        return self._logs.get(stream_id)

    def discard(self, stream_id: str) -> None:
        log = self._logs.pop(stream_id, None)
        if log is not None:
            if not log._finished:
                self._release(log)
            self._done.pop(stream_id, None)
            self.size -= log.size

    async def close(self) -> None:
        self._logs.clear()
        self._done.clear()
        self._running = 0
        self._per_client.clear()
        self.size = 0

    def __len__(self) -> int:
        return len(self._logs)

    def _finished(self, log: MemoryStreamLog) -> None:
        if self._logs.get(log.stream_id) is log:
            self._release(log)
            self._done[log.stream_id] = log

    def _release(self, log: MemoryStreamLog) -> None:
        self._running -= 1
        left = self._per_client[log.client] - 1
        if left:
            self._per_client[log.client] = left
        else:
            del self._per_client[log.client]

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

"""A stream's event log: written by its generation, read by any number of connections.

Handlers only use the :class:`StreamStore` and :class:`StreamLog` interfaces,
so a shared store (Redis Streams, for several processes) can replace the
in-memory one without touching them. Events are stored already encoded
as JSON, so each is serialised once however many readers it has.

A reader that asks for an event a store no longer keeps gets :class:`LogGap`,
never a silent hole.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

__all__ = ["EVENT_CODES", "EVENT_TYPES", "READ_BYTES", "Events", "LogGap", "StreamLog", "StreamStore"]

# The event contract's types, in the order of their one-byte codes in a log.
EVENT_TYPES = ("meta", "reasoning", "content", "tool_call", "done", "error")
EVENT_CODES = {kind: code for code, kind in enumerate(EVENT_TYPES)}

# How much JSON text one read returns (framed, one or two write slices of a sink):
# a reader resuming a long backlog never holds the event loop for long.
READ_BYTES = 48 * 1024


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

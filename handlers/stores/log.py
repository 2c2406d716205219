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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

__all__ = [
    "EVENT_CODES",
    "EVENT_TYPES",
    "LAST_KINDS",
    "READ_BYTES",
    "Events",
    "LogClosed",
    "LogGap",
    "Owner",
    "StreamLog",
    "StreamStore",
]

# The event contract's types, in the order of their one-byte codes in a log.
EVENT_TYPES = ("meta", "reasoning", "content", "tool_call", "done", "error")
EVENT_CODES = {kind: code for code, kind in enumerate(EVENT_TYPES)}
# The types that end a stream's log.
LAST_KINDS = frozenset({"done", "error"})

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


class LogClosed(Exception):
    """The log takes no more events: its stream was ended elsewhere (cancelled, or taken for dead)."""


class Owner(Protocol):
    """A generation running in this process, as a shared store sees it (see :meth:`StreamStore.watch`)."""

    def stop_requested(self) -> None:
        """Someone, in any process, asked for the stream to be cancelled."""

    def readers_elsewhere(self, count: int) -> None:
        """``count`` other processes have readers of the stream now."""


class StreamLog(ABC):
    """The events of one stream, in order."""

    stream_id: str
    # Who may read or cancel the stream (an access token's fingerprint); None: anyone.
    principal: str | None = None
    # The last event when this view of the log was opened: where to read from for its end alone.
    last_known = 0

    @abstractmethod
    async def append(self, events: Sequence[tuple[str, bytes]]) -> Events:
        """Add ``(type, json)`` events, numbered on from the last one; return them, numbered.

        Raises :class:`LogClosed` when the stream was ended elsewhere.
        """

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

    @property
    def handed_over(self) -> bool:
        """Whether the store, no longer this process, tells how the stream goes on.

        A shared store's writer that lost track of what the store holds (a
        write whose reply never came) hands its stream over: readers then
        read it from the store, as another process's do.
        """
        return False

    @abstractmethod
    def subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever events are appended or the log finishes."""

    @abstractmethod
    def unsubscribe(self, wake: Callable[[], None]) -> None: ...


class StreamStore(ABC):
    """Where logs live, keyed by stream id, and what processes serving one stream space share.

    The memory store serves one process, which shares nothing; a shared
    store (Redis) also counts concurrent streams across processes, carries
    cancellations to the process that runs a generation, and tells it of
    readers elsewhere.
    """

    # Whether other processes serve the same streams, and this one's name among them.
    shared = False
    process = ""

    @abstractmethod
    async def create(self, stream_id: str, *, client: str, principal: str | None = None) -> StreamLog:
        """A new stream's log, counted against the concurrency limits until it finishes.

        Raises :class:`~handlers.errors.RelayError` (503 ``server_busy`` or
        429 ``too_many_streams``) when the limits are reached.
        """

    @abstractmethod
    async def get(self, stream_id: str) -> StreamLog | None:
        """The log, or ``None`` if it never existed or has expired."""

    @abstractmethod
    def discard(self, stream_id: str) -> None:
        """Forget what this process holds of the stream (its retention is over)."""

    @abstractmethod
    async def close(self) -> None:
        """Release everything (application cleanup)."""

    async def request_cancel(self, stream_id: str) -> bool:
        """Ask the process running the stream to cancel it; False if it is not running."""
        return False

    def watch(self, stream_id: str, owner: Owner) -> None:
        """Tell ``owner`` of cancellations and readers elsewhere until its log finishes."""
        return None  # One process shares nothing.

    async def reader_joined(self, stream_id: str) -> None:
        """A connection of this process follows a stream that runs elsewhere."""
        return None  # One process shares nothing.

    async def reader_left(self, stream_id: str) -> None:
        """That connection stopped following."""
        return None  # One process shares nothing.

    async def readers_elsewhere(self, stream_id: str) -> int:
        """How many other processes have readers of the stream now."""
        return 0

    async def unavailable(self) -> str | None:
        """Why the store cannot serve now, or None when it can (for readiness probes)."""
        return None

    def share_metrics(self, snapshot: Callable[[], bytes]) -> None:
        """Publish ``snapshot()`` (this process's metrics) where other processes can read them, every few seconds."""
        return None  # One process shares nothing.

    async def gather_metrics(self, own: bytes) -> Mapping[str, bytes] | None:
        """Every live process's metrics snapshot, by process (``own`` included); None when there is one process."""
        return None

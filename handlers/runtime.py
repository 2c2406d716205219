"""Process-wide tuning, applied by the server's own entry points, never by ``create_app``.

**The allocator.** asyncio's selector transports read with ``sock.recv(256 KiB)``. With glibc's
default allocator settings, every such read maps a fresh 256 KiB block, shrinks
it to the bytes that came and unmaps it: three extra system calls and a page
fault per upstream read, about 16 µs each time on a VM, which was the largest
single cost of relaying a token (see bench/README.md and CPython issue
#85451). Serving those blocks from the heap, and not handing the heap's top
back to the system after every read, makes such a read cost what a 4 KiB one
does.

**The garbage collector.** Each live stream holds a hundred or so objects the
collector tracks (aiohttp's request, response, transports and tasks, the
relay's own), so with a thousand streams a full collection walked about 200,000
objects and stopped everything for up to 170 ms, and the collections of the
younger generations, every 700 allocations, took about a tenth of the relay's
CPU. Freezing what exists once the app is built (modules, routes, settings:
never garbage) and collecting the young generation every 20,000 allocations
instead kept pauses near 10 ms and the collector's share of the CPU near 1 %.
A full collection still runs now and then (about every 8 million
allocations); it is longer the more streams are live.

**Open files.** Each stream holds about three descriptors (its client's
connection, the provider's, and with the demo model the demo's own end), and a
common soft limit is 1,024: about 340 streams, against a default
``--max-streams`` of 5,000. The soft limit is raised to the hard one, and a
warning says when even that cannot cover ``max_streams``. When descriptors run
out all the same, asyncio logs a traceback for each connection it fails to
accept, thousands a second; :func:`quiet_accept_errors` makes that one line a
second.

An application that embeds the relay may call :func:`tune_process` itself; it
changes the whole process.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import platform
from typing import Any

__all__ = ["quiet_accept_errors", "tune_allocator", "tune_descriptors", "tune_gc", "tune_process"]

logger = logging.getLogger(__name__)

# mallopt() parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above asyncio's 256 KiB reads, so that they come from the heap.
MMAP_THRESHOLD = 1 << 20
# Free memory at the heap's top is given back to the system only beyond this.
TRIM_THRESHOLD = 4 << 20
# Net allocations of tracked objects between young collections, and how many of each
# generation's collections trigger one of the next (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 20)
# Descriptors a stream holds, and those the process needs besides (standard streams, the listener, the loop).
FDS_PER_STREAM = 3
FDS_BESIDES_STREAMS = 64
# The soft limit asked for when the hard one is unlimited (where the kernel caps it lower, the raise fails).
_UNLIMITED_NOFILE = 1 << 20
# What asyncio's event loop says when accept() fails for want of descriptors or memory, and when one of the
# retries it then schedules (a second later, one per connection it failed to accept) finds the listener closed.
_ACCEPT_FAILED = "socket.accept() out of system resource"
_RETRY_ON_A_CLOSED_LISTENER = "Exception in callback BaseSelectorEventLoop._start_serving("


def tune_process(max_streams: int | None = None) -> None:
    """Everything below; call it once the app is built, just before serving."""
    tune_allocator()
    tune_gc()
    tune_descriptors(max_streams)


def tune_gc() -> None:
    """Freeze the objects that exist now and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def tune_descriptors(max_streams: int | None = None) -> int | None:
    """Raise the soft limit on open files to the hard one; warn if it cannot hold ``max_streams`` streams.

    Returns the soft limit then in force, or None where there is none to raise.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = _UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            logger.debug("could not raise the open-file limit from %d to %d", soft, target)
    if max_streams is not None and soft < max_streams * FDS_PER_STREAM + FDS_BESIDES_STREAMS:
        logger.warning(
            "the open-file limit (%d) covers about %d streams, not the %d of --max-streams: raise the limit "
            "(ulimit -n, LimitNOFILE= for systemd, --ulimit nofile= for Docker) or lower --max-streams",
            soft,
            max(0, (soft - FDS_BESIDES_STREAMS) // FDS_PER_STREAM),
            max_streams,
        )
    return soft


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` report failed accepts in one line a second instead of one traceback each.

    asyncio reports each failed accept() (out of descriptors: EMFILE), and it
    tries the whole listen queue each time, so a queue of thousands waiting
    for descriptors floods the log; and if the server then stops, each retry
    it scheduled fails on the closed listener with a traceback of its own.
    Other reports go where they went before.

    (The retries also pile up, so accepts that keep failing cost more CPU the
    longer they do: CPython issue 151615, fixed in later versions of asyncio.)
    """
    previous = loop.get_exception_handler()
    quiet_until = -1.0
    missed = 0

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal quiet_until, missed
        message = context.get("message", "")
        if message.startswith(_RETRY_ON_A_CLOSED_LISTENER) and isinstance(context.get("exception"), ValueError):
            return  # The server has stopped listening: there is nothing left to retry.
        if message != _ACCEPT_FAILED:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = loop.time()
        if now < quiet_until:
            missed += 1
            return
        exc = context.get("exception")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        logger.warning(
            "cannot accept connections: %s (%d more failed accepts in the last second); "
            "the open-file limit is too low for the load, or --max-streams too high",
            reason,
            missed,
        )
        quiet_until, missed = now + 1.0, 0

    loop.set_exception_handler(handle)


def tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds; False (and nothing changed) on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        tuned = False
    if not tuned:
        logger.debug("could not tune glibc's allocator")
    return tuned

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

An application that embeds the relay may call :func:`tune_process` itself; it
changes the whole process.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform

__all__ = ["tune_allocator", "tune_gc", "tune_process"]

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


def tune_process() -> None:
    """Everything below; call it once the app is built, just before serving."""
    tune_allocator()
    tune_gc()


def tune_gc() -> None:
    """Freeze the objects that exist now and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


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

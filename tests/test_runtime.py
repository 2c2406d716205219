"""The server process's tuning: what `python server.py` and the gunicorn factory apply before serving."""

from __future__ import annotations

import asyncio
import gc
import logging
import platform
from collections.abc import Iterator
from typing import Any

import pytest

from handlers import runtime

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the allocator tuning is glibc's"
)


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def in_heap(address: int) -> bool:
    """Whether ``address`` lies in the process's brk heap rather than in a separate mapping."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                start, end = (int(part, 16) for part in line.split()[0].split("-"))
                if start <= address < end:
                    return True
    return False


@glibc
def test_after_tuning_a_buffer_the_size_of_asyncios_reads_comes_from_the_heap_not_a_fresh_mapping() -> None:
    assert runtime.tune_allocator() is True

    # asyncio reads a socket into a new 256 KiB bytes object; untuned, glibc maps (and soon unmaps) each one.
    buffer = bytes(256 * 1024)
    assert in_heap(id(buffer))


def test_the_collector_freezes_what_exists_and_collects_young_objects_less_often(restored_gc: None) -> None:
    runtime.tune_gc()

    assert gc.get_threshold() == runtime.GC_THRESHOLDS
    assert gc.get_freeze_count() > 0


def test_other_event_loop_errors_are_still_reported_with_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def fails() -> None:
        raise RuntimeError("a bug")

    loop = asyncio.new_event_loop()
    try:
        runtime.quiet_accept_errors(loop)
        loop.call_soon(fails)
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()

    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


async def test_once_idle_after_a_burst_what_the_streams_left_in_cycles_is_collected(
    restored_gc: None, relay: Any
) -> None:
    # With the collector tuned as server.py tunes it, full collections are rare; a burst of dropped
    # connections leaves asyncio's transport cycles behind (CPython gh-100348, on 3.11). The relay
    # collects once it has been idle a moment, so the next burst reuses that memory instead of adding to it.
    runtime.tune_gc()
    client = await relay(disconnect_grace=0, demo_delay=0.05, retention=1)
    for _ in range(2):
        responses = [await client.get("/stream", params={"prompt": f"burst {i}"}) for i in range(40)]
        for response in responses:
            await response.content.readuntil(b"\n\n")
            response.close()
        await asyncio.sleep(4)  # the generations end, their streams expire, the relay is idle for a while

    assert gc.collect() < 200, "cycles of the burst were still waiting for a full collection"

"""What Linux's ``/proc`` says about a process and the machine: CPU time, memory, hardware.

The runner measures the relay from outside, as an operator would, so the
relay needs no instrumentation of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

__all__ = [
    "RssSampler",
    "cpu_model",
    "listen_overflows",
    "machine_busy_seconds",
    "memory_total_bytes",
    "process_cpu_seconds",
    "process_memory",
    "process_uses",
]

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds ``pid`` has used (``/proc/<pid>/stat`` utime, stime).

    Both matter here: on loopback much of a relay's cost is the kernel's (socket reads,
    writes and wake-ups), which no change to Python code removes.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: count fields after the last ")".
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def process_memory(pid: int) -> dict[str, int]:
    """``VmRSS`` (now) and ``VmHWM`` (peak since start) of ``pid``, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def process_uses(pid: int, library: str) -> bool:
    """Whether ``pid`` has a file whose path contains ``library`` mapped (e.g. uvloop's extension)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def listen_overflows() -> int | None:
    """Connections dropped machine-wide because a listen queue was full (``TcpExtListenOverflows``).

    Each such client retries its handshake a second or more later, which shows
    up as first tokens that wait seconds. None if ``/proc/net/netstat`` lacks it.
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(row["ListenOverflows"]) if "ListenOverflows" in row else None
    return None


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent busy since boot, and the part of it spent in softirqs (``/proc/stat``).

    On loopback, softirq time is mostly the kernel carrying the benchmark's own packets, and
    it is charged to no process; it is told apart so that it is not mistaken for other work.
    """
    # cpu  user nice system idle iowait irq softirq steal …
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK, ticks[6] / _TICK


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def memory_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Polls a process's RSS every ``interval`` seconds while a run goes on, keeping the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> int:
        """Stop polling (after one last sample) and return the peak in bytes."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._sample()
        return self.peak

    async def _poll(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)

    def _sample(self) -> None:
        try:
            rss = process_memory(self.pid).get("VmRSS", 0)
        except OSError:
            return  # The process has gone; the runner notices on its own.
        self.samples += 1
        self.peak = max(self.peak, rss)

"""What every benchmark process shares: the event loop, file limits, loopback only.

uvloop is optional: the tools use it when it is installed (it makes the mock
and the load generator cheaper, so the relay is more likely to be what is
measured), and run on asyncio's own loop otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["is_loopback", "raise_nofile_limit", "run", "uvloop_version"]

T = TypeVar("T")


def uvloop_version() -> str | None:
    """uvloop's version if it can be imported, else ``None``."""
    from importlib import metadata

    try:
        return metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        return None


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run``, on uvloop when asked for and installed."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop and uvloop_version() is not None:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine: the benchmark never targets anything else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

"""``python server.py``: starts, says where it listens, serves, and stops cleanly."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from helpers import ROOT, clean_env, parse_sse, start_server, stop_server


async def test_server_py_serves_the_page_and_the_demo_then_stops_on_sigint() -> None:
    process, port, log = await start_server("--demo-delay", "0")
    assert process.stderr is not None
    try:
        assert b"demo model" in log

        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as page:
                assert page.status == 200
                assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
            async with session.get(f"http://127.0.0.1:{port}/stream", params={"prompt": "hi"}) as response:
                events = parse_sse(await response.read())
        assert events[-1].event == "done"
    finally:
        code, rest = await stop_server(process)

    assert code == 0
    assert b"Traceback" not in rest


async def test_a_bad_setting_exits_with_status_2_and_a_message() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "server.py",
        "--base-url",
        "not a url",
        "--model",
        "m",
        cwd=ROOT,
        env=clean_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await process.communicate()

    assert process.returncode == 2
    assert b"absolute http" in err
    assert b"Traceback" not in err


async def test_a_port_already_in_use_exits_with_status_1_and_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "server.py", "--port", str(port), cwd=ROOT, env=clean_env(), stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(20):
            _, err = await process.communicate()

    assert process.returncode == 1
    assert f"cannot start: error while attempting to bind on address ('127.0.0.1', {port})".encode() in err
    assert b"in use" in err
    assert b"Traceback" not in err


def _somaxconn() -> int | None:
    """The kernel's cap on every listen queue (4096 by default since Linux 5.4); None off Linux."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except OSError:
        return None


async def _connections_taken_while_paused(process: asyncio.subprocess.Process, port: int, count: int) -> int:
    """Open ``count`` connections while the server cannot accept (stopped); return how many the kernel queued.

    Then let the server go on, and check that every queued connection is served.
    """
    process.send_signal(signal.SIGSTOP)
    try:

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                # Long enough for the test's own loop to finish every handshake the kernel
                # queued; the rest cannot get in while the server is stopped (their retries
                # find the queue as full as before).
                async with asyncio.timeout(2):
                    return await asyncio.open_connection("127.0.0.1", port)
            except TimeoutError:
                return None

        opened = await asyncio.gather(*(connect() for _ in range(count)))
    finally:
        process.send_signal(signal.SIGCONT)
    connections = [c for c in opened if c is not None]
    try:
        for _, writer in connections:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(20):
            answers = [await reader.read() for reader, _ in connections]
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
    finally:
        for _, writer in connections:
            writer.close()
    return len(connections)


async def test_a_burst_of_connections_waits_in_the_queue_while_the_server_is_busy() -> None:
    # Thousands of clients connecting at once find the server busy; with a short listen
    # queue (aiohttp's default is 128) the ones that overflow it wait a second or more.
    cap = _somaxconn()
    if cap is None or cap < 400:
        pytest.skip(f"the kernel caps listen queues at {cap}, too short to tell 2048 from aiohttp's 128")
    process, port, _ = await start_server()
    try:
        taken = await _connections_taken_while_paused(process, port, 400)
    finally:
        await stop_server(process)

    assert taken == 400


async def test_the_listen_queue_is_as_long_as_backlog_says() -> None:
    if _somaxconn() is None:
        pytest.skip("needs Linux's listen queue")
    process, port, _ = await start_server("--backlog", "16")
    try:
        taken = await _connections_taken_while_paused(process, port, 100)
    finally:
        await stop_server(process)

    assert 16 <= taken <= 20


# Open files: each stream holds about three descriptors, and a common soft limit is 1,024.


def open_file_limits(pid: int) -> tuple[int, int]:
    """The soft and hard limits on open files of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


needs_proc = pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads limits from Linux's /proc")


@needs_proc
async def test_the_open_file_limit_is_raised_to_the_hard_limit_at_start_up() -> None:
    process, _, _ = await start_server(nofile=(256, 4096))
    try:
        assert open_file_limits(process.pid) == (4096, 4096)
    finally:
        await stop_server(process)


@pytest.mark.parametrize(
    ("max_streams", "warned"),
    [pytest.param("5000", True, id="the default 5,000 streams"), pytest.param("40", False, id="40 streams")],
)
async def test_start_up_warns_when_the_open_file_limit_cannot_cover_max_streams(max_streams: str, warned: bool) -> None:
    process, _, log = await start_server("--max-streams", max_streams, nofile=(256, 256))
    await stop_server(process)

    assert (b"open-file limit (256) covers about 64 streams" in log) is warned, log.decode()


async def test_when_descriptors_run_out_failed_accepts_log_a_line_a_second_not_a_traceback_each() -> None:
    process, port, _ = await start_server("--max-streams", "10", nofile=(64, 64))
    assert process.stderr is not None
    # Read the log as it comes, so that a flood cannot block the server on a full pipe.
    log = asyncio.create_task(process.stderr.read())
    connections = []
    try:
        for _ in range(200):  # more than the server has descriptors for: the rest wait in the listen queue
            connections.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(3)
    finally:
        for _, writer in connections:
            writer.close()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rest = await log
            await process.wait()

    reported = [line for line in rest.splitlines() if b"cannot accept connections" in line]
    assert 1 <= len(reported) <= 6, rest.decode()[-3000:]
    # asyncio's own report, a traceback for each failed accept.
    assert b"out of system resource" not in rest
    assert b"Traceback" not in rest

"""``python server.py``: starts, says where it listens, serves, and stops cleanly."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
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

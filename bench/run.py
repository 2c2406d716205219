"""Run the standard benchmark and write its tables: ``python -m bench.run [--quick]``.

Starts the mock provider and, for each relay scenario, a fresh thinkstream
(so that its CPU time, baseline and peak memory belong to that scenario
alone), all as child processes on 127.0.0.1 with this same interpreter; runs
the load generator against each in its own process; and writes
``bench/RESULTS.md`` (``RESULTS-quick.md`` with ``--quick``) plus the raw
numbers as JSON next to it. Every child is stopped when the run ends, however
it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from . import procstat
from ._runtime import raise_nofile_limit, uvloop_version
from .report import NOISY_SHARE, render

__all__ = ["Scenario", "main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

PACE = 0.1
REASONING, CONTENT = 10, 40
PACED_STREAMS = (10, 100, 1000, 3000)
PACED_STREAMS_QUICK = (10, 100)
# Streams start spread over this many seconds, as real users do, rather than in one instant.
PACED_RAMP = 1.0
UNPACED = (50, 400, 1600)  # streams, reasoning and content tokens each
UNPACED_QUICK = (20, 200, 800)
# The same loads with --redis-url: readers on the generating process, and on another one.
REDIS_STREAMS = (10, 100, 1000)
REDIS_STREAMS_QUICK = (10, 100)
# Short, so that "after" shows memory once every finished stream has been forgotten.
RETENTION = 3.0
START_TIMEOUT = 20.0
# Before each run, wait (a bounded time) until other work uses at most this many cores:
# the machine may be shared, and its noise would land in the relay's figures.
QUIET_CORES = 0.25
QUIET_WAIT = 10.0
QUIET_WAIT_QUICK = 1.0
# A run during which other processes took more than NOISY_SHARE of the cores is run again once,
# as long as the whole benchmark is younger than its budget (seconds).
RETRY_BUDGET = 200.0
RETRY_BUDGET_QUICK = 0.0


class BenchError(RuntimeError):
    """A piece of the benchmark would not start or run."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load, run once direct and once through the relay."""

    streams: int
    reasoning: int
    content: int
    pace: float
    ramp: float
    deadline: float

    def loadgen_args(self) -> list[str]:
        return [
            f"--streams={self.streams}",
            f"--tokens={self.content}",
            f"--reasoning={self.reasoning}",
            f"--pace={self.pace:g}",
            f"--ramp={self.ramp:g}",
            f"--deadline={self.deadline:g}",
            "--ttft=0",
        ]


def paced(streams: int) -> Scenario:
    duration = PACED_RAMP + (REASONING + CONTENT) * PACE
    return Scenario(streams, REASONING, CONTENT, PACE, PACED_RAMP, deadline=duration + 20)


def unpaced(quick: bool) -> Scenario:
    streams, reasoning, content = UNPACED_QUICK if quick else UNPACED
    return Scenario(streams, reasoning, content, 0.0, 0.0, deadline=60)


class Child:
    """A child process whose output goes to a log file, stopped for sure by :meth:`stop`."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            logger.warning("%s did not stop on SIGTERM; killing it", self.name)
            self.process.kill()
            await self.process.wait()


class Bench:
    """The run's children, logs and options."""

    def __init__(self, logs: Path, use_uvloop: bool, quiet_wait: float, retry_until: float) -> None:
        self.logs = logs
        self.use_uvloop = use_uvloop
        self.quiet_wait = quiet_wait
        # Noisy runs are repeated only until then, so that the whole run stays within its time.
        self.retry_until = retry_until
        self.relay_loop = "unknown"

    def _uvloop_flag(self) -> list[str]:
        return [] if self.use_uvloop else ["--no-uvloop"]

    async def _spawn(
        self, name: str, args: Sequence[str], *, stdout: int | None = None, program: str = sys.executable
    ) -> Child:
        log = self.logs / f"{name}.log"
        with log.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                program,
                *args,
                cwd=ROOT,
                env=_clean_environment(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout if stdout is not None else sink,
                stderr=sink,
            )
        return Child(name, process, log)

    @contextlib.asynccontextmanager
    async def mock(self) -> AsyncIterator[tuple[Child, str]]:
        """The mock provider on a free port; yields it and its base URL."""
        child = await self._spawn(
            "mock", ["-m", "bench.mock_upstream", "--port=0", *self._uvloop_flag()], stdout=asyncio.subprocess.PIPE
        )
        try:
            assert child.process.stdout is not None
            try:
                line = await asyncio.wait_for(child.process.stdout.readline(), START_TIMEOUT)
            except TimeoutError:
                line = b""
            url = line.decode().rpartition(" ")[2].strip()
            if not url.startswith("http://127.0.0.1:"):
                raise BenchError(f"the mock provider did not start:\n{child.log_tail()}")
            yield child, url
        finally:
            await child.stop()

    @contextlib.asynccontextmanager
    async def redis(self) -> AsyncIterator[tuple[Child, str] | None]:
        """A ``redis-server`` on a free port, persistence off; None where it is not installed."""
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            logger.warning("no redis-server here: the Redis scenarios are left out")
            yield None
            return
        port = _free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        child = await self._spawn("redis", args, program=binary)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                if time.monotonic() > deadline or child.process.returncode is not None:
                    raise BenchError(f"redis-server did not start:\n{child.log_tail()}")
                await asyncio.sleep(0.05)
            yield child, f"redis://127.0.0.1:{port}/0"
        finally:
            await child.stop()

    @contextlib.asynccontextmanager
    async def relay(self, mock_url: str, *extra: str) -> AsyncIterator[tuple[Child, str]]:
        """A fresh thinkstream in front of the mock, with every limit raised out of the benchmark's way."""
        port = _free_port()
        args = [
            "server.py",
            f"--port={port}",
            f"--base-url={mock_url}",
            "--model=bench",
            "--rate-limit=1000000/minute",
            "--client-streams=100000",
            "--max-streams=100000",
            f"--buffer-total-bytes={8 << 30}",
            f"--retention={RETENTION:g}",
            "--shutdown-timeout=2",
            "--log-level=WARNING",
            *extra,
        ]
        child = await self._spawn(f"relay-{port}", args)
        url = f"http://127.0.0.1:{port}"
        try:
            await _wait_healthy(child, url + "/healthz")
            await _warm_up(url)
            self.relay_loop = "uvloop" if procstat.process_uses(child.pid, "uvloop") else "asyncio"
            yield child, url
        finally:
            await child.stop()
            if child.process.returncode not in (0, None):
                logger.warning("relay exited with %s:\n%s", child.process.returncode, child.log_tail())

    async def load(self, mode: str, url: str, scenario: Scenario, follow_url: str | None = None) -> dict[str, Any]:
        """Run the load generator in its own process and return its report.

        Its ``loadgen_cpu_s`` counts the run only; ``loadgen_total_cpu_s`` added here
        counts the whole process, start-up included (the only child reaped meanwhile).
        """
        args = ["-m", "bench.loadgen", f"--mode={mode}", f"--url={url}", *scenario.loadgen_args()]
        if follow_url is not None:
            args.append(f"--follow-url={follow_url}")
        before = _children_cpu_seconds()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            *self._uvloop_flag(),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), scenario.deadline + 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            raise BenchError(f"the load generator failed ({process.returncode}):\n{err.decode(errors='replace')}")
        report: dict[str, Any] = orjson.loads(out)
        report["loadgen_total_cpu_s"] = round(_children_cpu_seconds() - before, 3)
        return report

    async def measure(
        self,
        mode: str,
        url: str,
        scenario: Scenario,
        mock: Child,
        relay: Child | None = None,
        *,
        others: dict[str, Child] | None = None,
        follow_url: str | None = None,
    ) -> dict[str, Any]:
        """One load run, with the CPU each process used and the relay's memory around it.

        ``others`` are further processes whose CPU counts (a second relay, Redis).
        """
        busy_cores = await _wait_quiet(self.quiet_wait)
        watched = {"mock": mock.pid} | ({"relay": relay.pid} if relay is not None else {})
        watched |= {name: child.pid for name, child in (others or {}).items()}
        cpu_before = {name: procstat.process_cpu_seconds(pid) for name, pid in watched.items()}
        busy_before = procstat.machine_busy_seconds()
        overflows_before = procstat.listen_overflows()
        runner_before = _own_cpu_seconds()
        sampler = None
        memory: dict[str, int] = {}
        if relay is not None:
            memory["baseline"] = procstat.process_memory(relay.pid)["VmRSS"]
            sampler = procstat.RssSampler(relay.pid)
            sampler.start()
        started = time.monotonic()
        try:
            report = await self.load(mode, url, scenario, follow_url)
        finally:
            if sampler is not None:
                memory["peak_polled"] = await sampler.stop()
        wall = time.monotonic() - started
        for child in (mock, relay, *(others or {}).values()):
            if child is not None and child.process.returncode is not None:
                raise BenchError(f"{child.name} exited during the run:\n{child.log_tail()}")
        cpu: dict[str, float] = {}
        for name, pid in watched.items():
            (user0, system0), (user1, system1) = cpu_before[name], procstat.process_cpu_seconds(pid)
            cpu[name] = user1 + system1 - user0 - system0
            cpu[f"{name}_system"] = system1 - system0
        cpu["loadgen"] = report["loadgen_total_cpu_s"]
        cpu["runner"] = _own_cpu_seconds() - runner_before
        busy, softirq = procstat.machine_busy_seconds()
        cpu["machine"] = busy - busy_before[0]
        cpu["softirq"] = softirq - busy_before[1]
        ours = cpu["loadgen"] + cpu["runner"] + cpu["softirq"] + sum(cpu[name] for name in watched)
        cpu["others"] = max(0.0, cpu["machine"] - ours)
        overflows = procstat.listen_overflows()
        result: dict[str, Any] = {
            "load": report,
            "wall_s": round(wall, 2),
            # Handshakes dropped for a full listen queue (the mock's or the relay's), machine-wide.
            "listen_overflows": None if overflows is None or overflows_before is None else overflows - overflows_before,
            "cpu_s": _rounded(cpu),
            "busy_cores_before": round(busy_cores, 2),
            # The share of all cores' time other processes took during this run.
            "others_share": round(cpu["others"] / (wall * (os.cpu_count() or 1)), 3),
        }
        if relay is not None:
            status = procstat.process_memory(relay.pid)
            memory["end"] = status["VmRSS"]
            memory["hwm"] = status["VmHWM"]
            memory["peak"] = max(memory["peak_polled"], status["VmHWM"])
            # Finished streams are kept for RETENTION seconds; look again once they are gone.
            await asyncio.sleep(RETENTION + 1.5)
            memory["after_expiry"] = procstat.process_memory(relay.pid)["VmRSS"]
            result["relay_rss_bytes"] = memory
            received = report["tokens_received"]
            if received:
                result["relay_cpu_s_per_1k_tokens"] = round(cpu["relay"] / received * 1000, 4)
                result["relay_system_cpu_s_per_1k_tokens"] = round(cpu["relay_system"] / received * 1000, 4)
                for name in others or {}:
                    result[f"{name}_cpu_s_per_1k_tokens"] = round(cpu[name] / received * 1000, 4)
            else:
                result["relay_cpu_s_per_1k_tokens"] = result["relay_system_cpu_s_per_1k_tokens"] = None
        return result

    async def compare(self, scenario: Scenario, mock: Child, mock_url: str) -> dict[str, Any]:
        """The scenario direct, then through a fresh relay; each run again once if the machine was busy."""
        label = f"{scenario.streams} streams x {scenario.reasoning + scenario.content} tokens, pace {scenario.pace:g}"

        async def direct() -> dict[str, Any]:
            logger.info("%s: direct", label)
            return await self.measure("direct", mock_url.removesuffix("/v1"), scenario, mock)

        async def relayed() -> dict[str, Any]:
            logger.info("%s: relay", label)
            async with self.relay(mock_url) as (relay, relay_url):
                return await self.measure("relay", relay_url, scenario, mock, relay)

        return {
            "scenario": _scenario_dict(scenario),
            "direct": await self._quietest(direct),
            "relay": await self._quietest(relayed),
        }

    async def compare_redis(
        self, scenario: Scenario, mock: Child, mock_url: str, redis: Child, redis_url: str
    ) -> dict[str, Any]:
        """The scenario through relays on one Redis: read where it runs, and read from another process."""
        label = f"{scenario.streams} streams x {scenario.reasoning + scenario.content} tokens, pace {scenario.pace:g}"
        tag = f"bench-{scenario.streams}-{scenario.pace:g}-{time.monotonic_ns()}"

        def flags(name: str) -> list[str]:
            return [f"--redis-url={redis_url}", f"--redis-prefix={tag}-{name}"]

        async def same() -> dict[str, Any]:
            logger.info("%s: redis, read where it runs", label)
            async with self.relay(mock_url, *flags("same")) as (relay, relay_url):
                return await self.measure("relay", relay_url, scenario, mock, relay, others={"redis": redis})

        async def elsewhere() -> dict[str, Any]:
            logger.info("%s: redis, read from another process", label)
            async with (
                self.relay(mock_url, *flags("other")) as (relay, relay_url),
                self.relay(mock_url, *flags("other")) as (reader, reader_url),
            ):
                return await self.measure(
                    "relay",
                    relay_url,
                    scenario,
                    mock,
                    relay,
                    others={"reader": reader, "redis": redis},
                    follow_url=reader_url,
                )

        return {
            "scenario": _scenario_dict(scenario),
            "same": await self._quietest(same),
            "elsewhere": await self._quietest(elsewhere),
        }

    async def _quietest(self, attempt: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``attempt``; if other processes took much of the cores meanwhile and time allows, once more.

        The quieter of the two is kept: on a shared machine, their noise would be read as the relay's.
        """
        result = await attempt()
        result["attempts"] = 1
        if result["others_share"] > NOISY_SHARE and time.monotonic() < self.retry_until:
            logger.info(
                "other processes used %.0f%% of the cores during that run: once more", 100 * result["others_share"]
            )
            again = await attempt()
            again["attempts"] = 2
            result = min(result, again, key=lambda r: float(r["others_share"]))
        return result


async def run_all(quick: bool, use_uvloop: bool, with_redis: bool = True) -> dict[str, Any]:
    """Every standard scenario; the raw results the tables are made from."""
    machine = _machine(use_uvloop)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="thinkstream-bench-") as logs:
        bench = Bench(
            Path(logs),
            use_uvloop,
            quiet_wait=QUIET_WAIT_QUICK if quick else QUIET_WAIT,
            retry_until=started + (RETRY_BUDGET_QUICK if quick else RETRY_BUDGET),
        )
        async with bench.mock() as (mock, mock_url):
            paced_runs = [
                await bench.compare(paced(n), mock, mock_url) for n in (PACED_STREAMS_QUICK if quick else PACED_STREAMS)
            ]
            unpaced_run = await bench.compare(unpaced(quick), mock, mock_url)
            redis_runs: list[dict[str, Any]] = []
            if with_redis:
                async with bench.redis() as found:
                    if found is not None:
                        redis, redis_url = found
                        for scenario in [
                            *(paced(n) for n in (REDIS_STREAMS_QUICK if quick else REDIS_STREAMS)),
                            unpaced(quick),
                        ]:
                            redis_runs.append(await bench.compare_redis(scenario, mock, mock_url, redis, redis_url))
        machine["relay_event_loop"] = bench.relay_loop
    machine["duration_s"] = round(time.monotonic() - started, 1)
    return {
        "quick": quick,
        "machine": machine,
        "settings": {"pace_s": PACE, "ramp_s": PACED_RAMP, "retention_s": RETENTION},
        "paced": paced_runs,
        "unpaced": unpaced_run,
        "redis": redis_runs,
    }


def _machine(use_uvloop: bool) -> dict[str, Any]:
    version = uvloop_version()
    return {
        "cpu": procstat.cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(procstat.memory_total_bytes() / (1 << 30), 1),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "kernel": platform.release(),
        "bench_event_loop": f"uvloop {version}" if use_uvloop and version else "asyncio",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _scenario_dict(scenario: Scenario) -> dict[str, Any]:
    return {
        "streams": scenario.streams,
        "reasoning": scenario.reasoning,
        "content": scenario.content,
        "tokens": scenario.reasoning + scenario.content,
        "pace_s": scenario.pace,
        "ramp_s": scenario.ramp,
    }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in values.items()}


def _clean_environment() -> dict[str, str]:
    """This environment without provider keys or relay settings, so only the runner's flags count."""
    prefixes = ("LLM_", "OPENAI_", "DEEPSEEK_", "THINKSTREAM_")
    return {name: value for name, value in os.environ.items() if not name.startswith(prefixes)}


async def _wait_quiet(limit: float) -> float:
    """Wait up to ``limit`` seconds for the cores to be nearly idle; return the busy cores last seen."""
    deadline = time.monotonic() + limit
    waited = False
    while True:
        busy, started = procstat.machine_busy_seconds()[0], time.monotonic()
        await asyncio.sleep(0.5)
        cores = (procstat.machine_busy_seconds()[0] - busy) / (time.monotonic() - started)
        if cores <= QUIET_CORES or time.monotonic() >= deadline:
            if waited and cores > QUIET_CORES:
                logger.warning("the machine is still busy (%.2f cores used by others); running anyway", cores)
            return cores
        if not waited:
            logger.info("waiting up to %g s for a quieter machine (%.2f cores busy)", limit, cores)
            waited = True


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_healthy(child: Child, url: str) -> None:
    """Poll ``url`` until it answers 200, the child exits, or START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline and child.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise BenchError(f"{child.name} did not become healthy at {url}:\n{child.log_tail()}")


async def _warm_up(url: str) -> None:
    """One short stream, so that the baseline is taken with every code path loaded."""
    body = {"messages": [{"role": "user", "content": "bench tokens=5 reasoning=2"}]}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(url + "/stream", json=body) as response,
    ):
        if response.status != 200:
            raise BenchError(f"the relay refused the warm-up stream: {response.status} {await response.text()}")
        await response.read()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (N = 10, 100; a smaller unpaced run)")
    parser.add_argument("--no-uvloop", action="store_true", help="run the mock and load generator on asyncio's loop")
    parser.add_argument("--no-redis", action="store_true", help="leave out the scenarios with --redis-url")
    parser.add_argument("--output", type=Path, help="where to write the markdown (default bench/RESULTS[-quick].md)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, stream=sys.stderr)
    raise_nofile_limit()  # The children inherit it: the relay holds two sockets a stream.
    output: Path = args.output or HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    try:
        results = asyncio.run(run_all(args.quick, not args.no_uvloop, not args.no_redis))
    except BenchError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; every child process has been stopped")
        return 130
    markdown = render(results)
    output.write_text(markdown)
    output.with_suffix(".json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(markdown)
    logger.info("wrote %s and %s", output, output.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn the runner's raw results into ``RESULTS.md``: tables, where it bends, the targets.

Pure: a results dict in, markdown out. "Added delay" is always the relay's
one-way delay percentile minus direct's at the same N in the same run, so the
mock's and the load generator's own costs cancel out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["added_delay", "bend_note", "redis_targets", "render", "targets"]

# The targets (same machine, same run, relative to direct).
ADDED_P50_MS = 1.0
ADDED_P99_MS = 5.0
TTFT_P99_MS = 50.0
CPU_S_PER_1K = 0.08
UNPACED_TOKENS_S = 100_000
DIRECT_TOKENS_S = 230_000
PEAK_RSS_MIB = 120
# "Back to baseline": within this share of the baseline once finished streams expired.
BASELINE_SLACK = 0.10
# "Not the bottleneck": relay throughput at least this share of direct's.
NOT_BOTTLENECK_RATIO = 0.95
# With --redis-url (issue 13): relay CPU per token at most this multiple of the in-memory figure,
# and a reader on another process at most this added delay (p50) at 100 streams.
REDIS_CPU_RATIO = 1.5
REDIS_ELSEWHERE_P50_MS = 2.0
# A run during which other processes took more than this share of all cores' time is marked noisy.
NOISY_SHARE = 0.10
NOISY_MARK = "†"

Run = dict[str, Any]


def render(results: Run) -> str:
    """The whole ``RESULTS.md``."""
    paced, unpaced = results["paced"], results["unpaced"]
    out = [
        "# thinkstream benchmark results" + (" (quick smoke run)" if results["quick"] else ""),
        "",
        "Written by `python -m bench.run" + (" --quick" if results["quick"] else "") + "`; see `bench/README.md` "
        "for what each column means. Raw numbers: the `.json` file next to this one.",
        "",
        _machine(results),
        "",
        _setup(results),
        "",
        "## Paced: loss and latency",
        "",
        *_paced_latency(paced),
        "",
        "## Paced: cost as N grows",
        "",
        *_paced_cost(paced),
        "",
        "## Unpaced: throughput",
        "",
        *_unpaced(unpaced),
        "",
        "## Where the CPU went",
        "",
        *_cpu([*paced, unpaced]),
        "",
        *_redis_section(results),
        "## Where it bends",
        "",
        bend_note(paced),
        "",
        "## Against the targets",
        "",
        *targets(results),
        "",
    ]
    if any(_noisy(run) for run in [*paced, unpaced]):
        out += [
            f"{NOISY_MARK} Other processes took more than {NOISY_SHARE:.0%} of the cores' time during the direct "
            "or relay run of this row (after waiting for a quiet machine, and one retry while time allowed): "
            "its latencies and throughput are partly theirs.",
            "",
        ]
    problems = _problems([*paced, unpaced])
    if problems:
        out += ["## Streams that were not ok", "", *problems, ""]
    return "\n".join(out)


def _machine(results: Run) -> str:
    m = results["machine"]
    load = m["load_average_at_start"]
    parts = [run[mode] for run in [*results["paced"], results["unpaced"]] for mode in ("direct", "relay")]
    others = sum(part["cpu_s"]["others"] for part in parts)
    wall = sum(part["wall_s"] for part in parts)
    share = others / (wall * (m["cores"] or 1)) if wall else 0.0
    return (
        f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Linux {m['kernel']}; "
        f"Python {m['python']}, aiohttp {m['aiohttp']}; mock and load generator on {m['bench_event_loop']}, "
        f"relay on {m['relay_event_loop']}; {m['date']}; whole run {m['duration_s']:.0f} s. "
        f"**Noise:** load average {load[0]:.2f} before the run; processes other than the benchmark's used "
        f"{others:.1f} CPU seconds during the load runs, {share:.0%} of the cores' time "
        f'(see "other processes" below; above a few % the latency figures are theirs as much as the relay\'s).'
    )


def _setup(results: Run) -> str:
    s = results["settings"]
    first = results["paced"][0]["scenario"]
    u = results["unpaced"]["scenario"]
    return (
        f"**Paced:** {first['tokens']} tokens a stream ({first['reasoning']} reasoning, then "
        f"{first['content']} content), {s['pace_s'] * 1000:g} ms apart, the first at once; the N streams "
        f"start evenly over {s['ramp_s']:g} s. **Unpaced:** {u['streams']} streams x {u['tokens']:,} tokens "
        f"({u['reasoning']:,} + {u['content']:,}), all at once, the mock writing 16 token events a write as "
        f"fast as the socket takes them. Each relay run is a fresh `python server.py` with its limits raised "
        f"and `--retention {s['retention_s']:g}`; direct runs go to the same mock without it."
    )


def _table(header: list[str], rows: list[list[str]], *, text: int = 1) -> list[str]:
    """A markdown table; the first ``text`` columns left-aligned, numbers right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":---" if i < text else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pair(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{_num(a, digits)} / {_num(b, digits)}"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / (1 << 20):.1f}"


def _cpu_per_1k(relay: Run) -> str:
    total, kernel = relay["relay_cpu_s_per_1k_tokens"], relay["relay_system_cpu_s_per_1k_tokens"]
    return "—" if total is None else f"{total:.4f} ({kernel:.4f})"


def _outcomes(load: Run) -> str:
    return f"{load['ok']} / {load['incomplete']} / {load['failed']}"


def _noisy(run: Run) -> bool:
    return any(run[mode].get("others_share", 0.0) > NOISY_SHARE for mode in ("direct", "relay"))


def _label(run: Run, text: str) -> str:
    return text + (f" {NOISY_MARK}" if _noisy(run) else "")


def added_delay(run: Run, key: str) -> float | None:
    """Relay one-way delay percentile ``key`` minus direct's, in ms."""
    relay, direct = run["relay"]["load"]["delay_ms"][key], run["direct"]["load"]["delay_ms"][key]
    return None if relay is None or direct is None else relay - direct


def _paced_latency(paced: list[Run]) -> list[str]:
    header = [
        "N",
        "ok / incomplete / failed: direct",
        "relay",
        "tokens lost: direct / relay",
        "one-way delay p50 / p99 ms: direct",
        "relay",
        "**added delay p50 / p99 ms**",
        "TTFT p50 / p99 ms: direct",
        "relay",
    ]
    rows = []
    for run in paced:
        d, r = run["direct"]["load"], run["relay"]["load"]
        rows.append(
            [
                _label(run, f"{d['streams']:,}"),
                _outcomes(d),
                _outcomes(r),
                f"{d['tokens_lost']:,} / {r['tokens_lost']:,}",
                _pair(d["delay_ms"]["p50"], d["delay_ms"]["p99"]),
                _pair(r["delay_ms"]["p50"], r["delay_ms"]["p99"]),
                "**" + _pair(added_delay(run, "p50"), added_delay(run, "p99")) + "**",
                _pair(d["ttft_ms"]["p50"], d["ttft_ms"]["p99"], 1),
                _pair(r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], 1),
            ]
        )
    return _table(header, rows)


def _paced_cost(paced: list[Run]) -> list[str]:
    header = [
        "N",
        "tokens/s: direct",
        "relay",
        "relay CPU s per 1,000 tokens (of which kernel)",
        "relay RSS MiB: baseline",
        "peak",
        "at end",
        "after expiry",
        "peak - baseline per stream KiB",
    ]
    rows = []
    for run in paced:
        d, r = run["direct"]["load"], run["relay"]["load"]
        rss = run["relay"]["relay_rss_bytes"]
        rows.append(
            [
                _label(run, f"{d['streams']:,}"),
                _num(d["tokens_per_s"], 0),
                _num(r["tokens_per_s"], 0),
                _cpu_per_1k(run["relay"]),
                _mib(rss["baseline"]),
                _mib(rss["peak"]),
                _mib(rss["end"]),
                _mib(rss["after_expiry"]),
                _num((rss["peak"] - rss["baseline"]) / 1024 / r["streams"], 1),
            ]
        )
    return _table(header, rows)


def _unpaced(run: Run) -> list[str]:
    d, r = run["direct"]["load"], run["relay"]["load"]
    rss = run["relay"]["relay_rss_bytes"]
    ratio = r["tokens_per_s"] / d["tokens_per_s"] if d["tokens_per_s"] else None
    header = [
        "streams x tokens",
        "tokens/s: direct",
        "**relay**",
        "relay / direct",
        "relay CPU s per 1,000 tokens (of which kernel)",
        "ok / incomplete / failed: direct",
        "relay",
        "tokens lost: direct / relay",
        "tokens per read: direct / relay",
        "relay RSS MiB: baseline / peak",
    ]
    row = [
        _label(run, f"{d['streams']} x {d['tokens_per_stream']:,}"),
        _num(d["tokens_per_s"], 0),
        "**" + _num(r["tokens_per_s"], 0) + "**",
        _num(ratio, 2),
        _cpu_per_1k(run["relay"]),
        _outcomes(d),
        _outcomes(r),
        f"{d['tokens_lost']:,} / {r['tokens_lost']:,}",
        _pair(d.get("tokens_per_read"), r.get("tokens_per_read"), 1),
        f"{_mib(rss['baseline'])} / {_mib(rss['peak'])}",
    ]
    return _table(header, [row])


def _cpu(runs: list[Run]) -> list[str]:
    header = [
        "scenario",
        "mode",
        "wall s",
        "mock",
        "relay (of which kernel)",
        "load generator",
        "softirq",
        "other processes",
        "relay % of one core",
        "listen overflows",
    ]
    rows = []
    for run in runs:
        s = run["scenario"]
        label = f"{s['streams']:,} x {s['tokens']:,}" + (" unpaced" if s["pace_s"] == 0 else " paced")
        for mode in ("direct", "relay"):
            part = run[mode]
            cpu = part["cpu_s"]
            relay = cpu.get("relay")
            rows.append(
                [
                    label,
                    mode + (" (2nd try)" if part.get("attempts", 1) > 1 else ""),
                    _num(part["wall_s"], 1),
                    _num(cpu["mock"], 2),
                    "—" if relay is None else f"{relay:.2f} ({cpu['relay_system']:.2f})",
                    _num(cpu["loadgen"], 2),
                    _num(cpu.get("softirq"), 2),
                    _num(cpu["others"], 2),
                    "—" if relay is None else f"{100 * relay / part['wall_s']:.0f} %",
                    _num(part.get("listen_overflows"), 0),
                ]
            )
    notes = [
        "",
        "CPU seconds used during each load run, from `/proc` (the load generator's include its start-up). "
        '"Softirq" is the kernel carrying packets (on loopback, mostly the benchmark\'s own), charged to no '
        'process. "Other processes" is the rest of the machine\'s busy time in `/proc/stat` over the same '
        'wall time: work that is not the benchmark\'s, competing for the same cores. "Listen overflows" are '
        "connections the kernel dropped during the run because a listen queue was full (machine-wide, from "
        "`/proc/net/netstat`); each such client waits a second or more to retry, so any above 0 show in TTFT.",
    ]
    return _table(header, rows, text=2) + notes


def _first(paced: list[Run], test: Callable[[Run], str | None]) -> tuple[int, str] | None:
    for run in paced:
        why = test(run)
        if why:
            return run["scenario"]["streams"], why
    return None


def _relay_short(run: Run) -> str | None:
    """Why the relay misses the paced targets at this N, or ``None``."""
    r = run["relay"]["load"]
    reasons = []
    if r["tokens_lost"]:
        reasons.append(f"{r['tokens_lost']:,} tokens lost")
    if r["ok"] != r["streams"]:
        reasons.append(f"{r['streams'] - r['ok']:,} streams not ok")
    p50, p99 = added_delay(run, "p50"), added_delay(run, "p99")
    if p50 is not None and p50 > ADDED_P50_MS:
        reasons.append(f"added delay p50 {p50:.2f} ms > {ADDED_P50_MS:g} ms")
    if p99 is not None and p99 > ADDED_P99_MS:
        reasons.append(f"added delay p99 {p99:.2f} ms > {ADDED_P99_MS:g} ms")
    ttft = r["ttft_ms"]["p99"]
    if ttft is not None and ttft > TTFT_P99_MS:
        reasons.append(f"relay TTFT p99 {ttft:.1f} ms > {TTFT_P99_MS:g} ms")
    return "; ".join(reasons) or None


def _direct_short(run: Run) -> str | None:
    d = run["direct"]["load"]
    reasons = []
    if d["tokens_lost"] or d["ok"] != d["streams"]:
        reasons.append(f"direct itself lost {d['tokens_lost']:,} tokens")
    p99 = d["delay_ms"]["p99"]
    if p99 is not None and p99 > ADDED_P99_MS:
        reasons.append(f"direct's own delay p99 is {p99:.2f} ms")
    return "; ".join(reasons) or None


def bend_note(paced: list[Run]) -> str:
    """Where the cost stops growing in a straight line, computed from the paced runs."""
    lines = []
    bend = _first(paced, _relay_short)
    if bend is None:
        top = paced[-1]["scenario"]["streams"]
        lines.append(f"- The relay meets the paced latency and loss targets at every N run, up to {top:,}.")
    else:
        n, why = bend
        lines.append(f"- **The relay first falls short at N = {n:,}**: {why}.")
        noisy = next(r for r in paced if r["scenario"]["streams"] == n)
        if _noisy(noisy):
            lines.append(
                f"- Other processes were busy during that N's runs ({NOISY_MARK}), so this may be their noise; "
                "run again on a quiet machine."
            )
            quiet = _first([r for r in paced if not _noisy(r)], _relay_short)
            if quiet is not None:
                lines.append(f"- Among the quiet rows, the relay first falls short at N = {quiet[0]:,}: {quiet[1]}.")
        machine = _first([r for r in paced if r["scenario"]["streams"] >= n], _direct_short)
        if machine is not None and machine[0] == n:
            lines.append(
                f"- At N = {n:,} direct degrades too ({machine[1]}): the mock and the load generator share "
                "the same cores, so part of the bend is the machine, not only the relay."
            )
    cpu = [(r["scenario"]["streams"], r["relay"]["relay_cpu_s_per_1k_tokens"]) for r in paced]
    cpu = [(n, c) for n, c in cpu if c is not None]
    if cpu:
        low = min(c for _, c in cpu)
        spread = ", ".join(f"{c:.4f} at N = {n:,}" for n, c in cpu)
        lines.append(
            f"- Relay CPU per 1,000 tokens: {spread} (largest / smallest: {max(c for _, c in cpu) / low:.1f}x; "
            "flat means CPU grows linearly with tokens; falling means fixed per-stream costs fade, or, once "
            "the relay is saturated, more tokens share each wake-up)."
        )
    per_stream = [
        (r["scenario"]["streams"], (r["relay"]["relay_rss_bytes"]["peak"] - r["relay"]["relay_rss_bytes"]["baseline"]))
        for r in paced
    ]
    lines.append(
        "- Relay memory above baseline at the peak: "
        + ", ".join(f"{m / (1 << 20):.1f} MiB at N = {n:,} ({m / 1024 / n:.0f} KiB a stream)" for n, m in per_stream)
        + " (small N is dominated by allocator granularity)."
    )
    ratios = []
    for r in paced:
        d_tps, r_tps = r["direct"]["load"]["tokens_per_s"], r["relay"]["load"]["tokens_per_s"]
        if d_tps:
            ratios.append(f"{r_tps / d_tps:.2f} at N = {r['scenario']['streams']:,}")
    if ratios:
        lines.append("- Relay tokens/s as a share of direct's: " + ", ".join(ratios) + ".")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _at(paced: list[Run], n: int) -> Run | None:
    return next((r for r in paced if r["scenario"]["streams"] == n), None)


def targets(results: Run) -> list[str]:
    """The issue's targets, each with what this run measured."""
    paced, unpaced = results["paced"], results["unpaced"]
    rows: list[list[str]] = []
    not_run = "not run (--quick)" if results["quick"] else "not run"

    run = _at(paced, 1000)
    if run is None:
        rows.append(
            ["1", "N = 1,000: no token lost, added delay ≤ 1 ms p50 and ≤ 5 ms p99, TTFT p99 ≤ 50 ms", "—", not_run]
        )
    else:
        r = run["relay"]["load"]
        p50, p99 = added_delay(run, "p50"), added_delay(run, "p99")
        rows += [
            ["1", "N = 1,000: no token lost", f"{r['tokens_lost']:,} lost", _verdict(r["tokens_lost"] == 0)],
            [
                "1",
                "N = 1,000: added delay ≤ 1 ms p50",
                f"{_num(p50)} ms",
                _verdict(p50 is not None and p50 <= ADDED_P50_MS),
            ],
            [
                "1",
                "N = 1,000: added delay ≤ 5 ms p99",
                f"{_num(p99)} ms",
                _verdict(p99 is not None and p99 <= ADDED_P99_MS),
            ],
            [
                "1",
                "N = 1,000: time to first token p99 ≤ 50 ms",
                f"{_num(r['ttft_ms']['p99'], 1)} ms (direct {_num(run['direct']['load']['ttft_ms']['p99'], 1)} ms)",
                _verdict(r["ttft_ms"]["p99"] is not None and r["ttft_ms"]["p99"] <= TTFT_P99_MS),
            ],
        ]
    run = _at(paced, 3000)
    if run is None:
        rows.append(["1", "N = 3,000: no token lost, relay not the bottleneck", "—", not_run])
    else:
        r, d = run["relay"]["load"], run["direct"]["load"]
        share = r["tokens_per_s"] / d["tokens_per_s"] if d["tokens_per_s"] else 0.0
        core = run["relay"]["cpu_s"]["relay"] / run["relay"]["wall_s"]
        rows += [
            ["1", "N = 3,000: no token lost", f"{r['tokens_lost']:,} lost", _verdict(r["tokens_lost"] == 0)],
            [
                "1",
                f"N = 3,000: relay not the bottleneck (all ok, tokens/s ≥ {NOT_BOTTLENECK_RATIO:.0%} of direct's)",
                f"{r['ok']:,} of {r['streams']:,} ok; {r['tokens_per_s']:,.0f} vs {d['tokens_per_s']:,.0f} tokens/s "
                f"({share:.0%}); relay TTFT p99 {_num(r['ttft_ms']['p99'], 1)} ms vs "
                f"{_num(d['ttft_ms']['p99'], 1)} ms; relay busy {core:.0%} of a core",
                _verdict(r["ok"] == r["streams"] and share >= NOT_BOTTLENECK_RATIO),
            ],
        ]
    cpu = [(r["scenario"]["streams"], r["relay"]["relay_cpu_s_per_1k_tokens"]) for r in paced]
    cpu = [(n, c) for n, c in cpu if c is not None]
    if cpu:
        worst = max(c for _, c in cpu)
        rows.append(
            [
                "2",
                "relay CPU ≤ 0.08 ms per relayed paced token (= 0.08 s per 1,000), at every N",
                "; ".join(f"{c:.3f} at N = {n:,}" for n, c in cpu) + " (s per 1,000)",
                _verdict(worst <= CPU_S_PER_1K),
            ]
        )
    d, r = unpaced["direct"]["load"], unpaced["relay"]["load"]
    size = f"{d['streams']} x {d['tokens_per_stream']:,}"
    full = d["streams"] == 50 and d["tokens_per_stream"] == 2000
    rows.append(
        [
            "3",
            "unpaced 50 x 2,000: ≥ 100,000 tokens/s through the relay",
            f"{r['tokens_per_s']:,.0f} tokens/s ({size})",
            _verdict(r["tokens_per_s"] >= UNPACED_TOKENS_S) if full else f"{not_run} at full size",
        ]
    )
    rows.append(
        [
            "3",
            "(reference) direct over 230,000 tokens/s",
            f"{d['tokens_per_s']:,.0f} tokens/s",
            "reference: this machine's mock + load generator",
        ]
    )
    run = _at(paced, 3000)
    if run is None:
        rows.append(["4", "peak RSS ≤ 120 MiB at N = 3,000, back to baseline after", "—", not_run])
    else:
        rss = run["relay"]["relay_rss_bytes"]
        back = rss["after_expiry"] <= rss["baseline"] * (1 + BASELINE_SLACK)
        rows += [
            [
                "4",
                "peak RSS ≤ 120 MiB at N = 3,000 (resume buffers included)",
                f"{_mib(rss['peak'])} MiB",
                _verdict(rss["peak"] <= PEAK_RSS_MIB << 20),
            ],
            [
                "4",
                f"back to baseline after the streams end (within {BASELINE_SLACK:.0%}, once expired)",
                f"baseline {_mib(rss['baseline'])}, at end {_mib(rss['end'])}, "
                f"after expiry {_mib(rss['after_expiry'])} MiB",
                _verdict(back),
            ],
        ]
    rows.append(["5", "cost grows linearly (tokens/s and RSS at N = 10 … 3,000)", "see the cost table", "see note"])
    rows += redis_targets(results)
    return _table(["#", "target", "measured", "verdict"], rows, text=4)


def _memory_run(results: Run, redis_run: Run) -> Run | None:
    """The in-memory run of the same scenario, from the same benchmark."""
    scenario = redis_run["scenario"]
    for run in [*results["paced"], results["unpaced"]]:
        if run["scenario"] == scenario:
            return run
    return None


def _redis_added(redis_run: Run, memory_run: Run | None, mode: str, key: str) -> float | None:
    """One-way delay through Redis relays minus direct's, with direct from the in-memory comparison."""
    if memory_run is None:
        return None
    relayed = redis_run[mode]["load"]["delay_ms"][key]
    direct = memory_run["direct"]["load"]["delay_ms"][key]
    return None if relayed is None or direct is None else relayed - direct


def _redis_section(results: Run) -> list[str]:
    """The same loads with ``--redis-url``: read where the stream runs, and from another process."""
    runs = results.get("redis") or []
    if not runs:
        return []
    rows = []
    for run in runs:
        memory = _memory_run(results, run)
        s = run["scenario"]
        label = f"{s['streams']:,} x {s['tokens']:,}" + (" unpaced" if not s["pace_s"] else "")
        same, other = run["same"], run["elsewhere"]
        memory_cpu = memory["relay"]["relay_cpu_s_per_1k_tokens"] if memory else None
        same_cpu = same.get("relay_cpu_s_per_1k_tokens")
        ratio = same_cpu / memory_cpu if same_cpu and memory_cpu else None
        other_cpu = (other.get("relay_cpu_s_per_1k_tokens") or 0) + (other.get("reader_cpu_s_per_1k_tokens") or 0)
        lost = f"{same['load']['tokens_lost']:,} / {other['load']['tokens_lost']:,}"
        rows.append(
            [
                label,
                lost,
                _pair(_redis_added(run, memory, "same", "p50"), _redis_added(run, memory, "same", "p99")),
                _pair(_redis_added(run, memory, "elsewhere", "p50"), _redis_added(run, memory, "elsewhere", "p99")),
                f"{_num(memory_cpu, 3)} / {_num(same_cpu, 3)} ({_num(ratio, 2)}x)",
                f"{_num(other_cpu, 3)}",
                f"{_num(same.get('redis_cpu_s_per_1k_tokens'), 3)} / {_num(other.get('redis_cpu_s_per_1k_tokens'), 3)}",
                f"{same['load']['tokens_per_s']:,.0f} / {other['load']['tokens_per_s']:,.0f}",
            ]
        )
    return [
        "## With Redis (`--redis-url`)",
        "",
        "The same loads through relays that share a local `redis-server`: *here* reads each stream from the "
        "process that runs it; *elsewhere* starts it on one relay process and reads it from a second one "
        "(`GET /stream/{id}`). Added delay is against the direct run of the in-memory comparison; CPU is "
        "seconds per 1,000 relayed tokens.",
        "",
        *_table(
            [
                "streams x tokens",
                "tokens lost here / elsewhere",
                "added delay here p50 / p99 (ms)",
                "added delay elsewhere p50 / p99 (ms)",
                "relay CPU: in memory / here",
                "both relays' CPU, elsewhere",
                "redis-server CPU here / elsewhere",
                "tokens/s here / elsewhere",
            ],
            rows,
        ),
        "",
    ]


def redis_targets(results: Run) -> list[list[str]]:
    """Issue 13's performance targets, each with what this run measured."""
    runs = results.get("redis") or []
    if not runs:
        return []
    rows = []
    lost = sum(run[mode]["load"]["tokens_lost"] for run in runs for mode in ("same", "elsewhere"))
    rows.append(["R", "with Redis: no token lost", f"{lost:,} lost", _verdict(lost == 0)])
    ratios = []
    for run in runs:
        memory = _memory_run(results, run)
        same_cpu, memory_cpu = run["same"].get("relay_cpu_s_per_1k_tokens"), None
        if memory is not None:
            memory_cpu = memory["relay"]["relay_cpu_s_per_1k_tokens"]
        if same_cpu and memory_cpu:
            ratios.append((run["scenario"], same_cpu / memory_cpu))
    if ratios:
        worst = max(r for _, r in ratios)
        rows.append(
            [
                "R",
                f"with Redis: relay CPU per token ≤ {REDIS_CPU_RATIO}x the in-memory figure",
                "; ".join(f"{r:.2f}x at {s['streams']:,}{'' if s['pace_s'] else ' unpaced'}" for s, r in ratios),
                _verdict(worst <= REDIS_CPU_RATIO),
            ]
        )
    hundred = next((r for r in runs if r["scenario"]["streams"] == 100 and r["scenario"]["pace_s"]), None)
    if hundred is not None:
        p50 = _redis_added(hundred, _memory_run(results, hundred), "elsewhere", "p50")
        rows.append(
            [
                "R",
                f"with Redis: a reader on another process, added delay p50 ≤ {REDIS_ELSEWHERE_P50_MS:g} ms at N = 100",
                f"{_num(p50)} ms",
                _verdict(p50 is not None and p50 <= REDIS_ELSEWHERE_P50_MS),
            ]
        )
    return rows


def _problems(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        s = run["scenario"]
        for mode in ("direct", "relay"):
            reasons = run[mode]["load"]["reasons"]
            if reasons:
                what = ", ".join(f"{count:,} {reason}" for reason, count in reasons.items())
                lines.append(f"- {mode}, {s['streams']:,} streams x {s['tokens']:,} tokens: {what}")
    return lines

#!/usr/bin/env bash
# Profile the relay's own process under N paced streams with py-spy (pip install py-spy):
#   bash bench/profile.sh [N] [output]      e.g. bash bench/profile.sh 1000 /tmp/relay.prof
# Starts the mock (port 18601) and a relay (port 18602) on loopback, samples the relay for 9 s while the
# load generator runs, then prints the functions with the most samples of their own and in total.
set -euo pipefail
N=${1:-1000}
OUT=${2:-/tmp/relay.prof}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SPY_BIN=${PY_SPY:-$(dirname "$PY")/py-spy}
$PY -m bench.mock_upstream --port 18601 >/dev/null 2>&1 &
MOCK=$!
$PY server.py --port 18602 --base-url http://127.0.0.1:18601/v1 --model bench --rate-limit 1000000/minute \
  --client-streams 100000 --max-streams 100000 --log-level WARNING >/dev/null 2>&1 &
RELAY=$!
trap 'kill $RELAY $MOCK 2>/dev/null || true' EXIT
sleep 1.5
"$SPY_BIN" record -p "$RELAY" -r 200 -f raw -o "$OUT" -d 9 >/dev/null 2>&1 &
SPY=$!
$PY -m bench.loadgen --mode relay --url http://127.0.0.1:18602 --streams "$N" --pace 0.1 --deadline 30 >/dev/null
wait $SPY
$PY - "$OUT" <<'PYTHON'
import collections, sys

own, total, inclusive = collections.Counter(), 0, collections.Counter()
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    frames, n = stack.split(";"), int(count)
    total += n
    own[frames[-1]] += n
    for frame in set(frames):
        inclusive[frame] += n
print(f"{total} samples\nown time:")
for frame, n in own.most_common(15):
    print(f"  {n / total:6.1%}  {frame[:140]}")
print("in total (the relay's and aiohttp's own code):")
for frame, n in [(f, n) for f, n in inclusive.most_common(80) if "handlers" in f or "aiohttp" in f][:25]:
    print(f"  {n / total:6.1%}  {frame[:140]}")
PYTHON

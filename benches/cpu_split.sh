#!/usr/bin/env bash
# User and system CPU time per request, per thread of the gateway, from /proc/PID/task/*/stat:
# which side of the kernel line a difference between two routes (or binaries) lies on, which
# scripts/bench.sh's one CPU figure per run cannot tell.
#
#   benches/cpu_split.sh BIN VARIANT LUA [SECONDS]
#
#   VARIANT  off: the plain route (benches/proxies/ringway-sse-off.toml)
#            on:  the AI chain key-auth + token-limit + cost-limit + ai-stats
#                 (benches/proxies/ringway-budget-on.toml)
#   LUA      benches/wrk/chat.lua (non-streamed JSON) or benches/wrk/sse.lua (200 frames)
#
# One worker on the default driver, the origin benches/backend/sse_backend.py, wrk -c64 for 1 s
# of warm-up, then SECONDS (4) measured. Times come in clock ticks (10 ms): run long enough that
# a thread's share is many ticks. Prints one line per thread that used CPU.
set -euo pipefail
BIN=$1 VARIANT=$2 LUA=$3 SECS=${4:-4}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
. "$ROOT/benches/ab_route.sh"
sed -e "s/@WORKERS@/1/; s/@PORT@/$port/; s/@UPSTREAM_PORT@/$up/" "$tmpl" > "$WORK/ringway.toml"
"$BIN" --conf "$WORK/ringway.toml" > "$WORK/ringway.log" 2>&1 &
rw=$!
pids+=($rw)
wait_port "$port"
url="http://127.0.0.1:$port/v1/chat/completions"
wrk -t1 -c64 -d1s -s "$LUA" "$url" > /dev/null
# comm, utime, stime of every thread (fields 14 and 15; a comm has no spaces here).
snap() { for t in /proc/"$rw"/task/*; do echo "$(cat "$t/comm") $(awk '{print $14, $15}' "$t/stat")"; done; }
snap > "$WORK/before"
wrk -t1 -c64 -d"${SECS}s" -s "$LUA" "$url" > "$WORK/wrk.out"
snap > "$WORK/after"
n=$(grep -oE '^ *[0-9]+ requests' "$WORK/wrk.out" | grep -oE '[0-9]+')
tck=$(getconf CLK_TCK)
paste "$WORK/before" "$WORK/after" | awk -v n="$n" -v t="$tck" -v v="$VARIANT" -v l="$(basename "$LUA")" \
  '{ u = ($5 - $2) * 1e6 / t / n; s = ($6 - $3) * 1e6 / t / n;
     if (u + s > 0) printf "%s %s %-14s user %.2f us, system %.2f us per request (%d requests)\n", v, l, $1, u, s, n }'

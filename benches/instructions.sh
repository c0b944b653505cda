#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: a figure that does not move with the
# neighbours of a shared VM, unlike CPU time (two runs ten minutes apart differ by 20 % here).
# It leaves out the kernel, and an instruction is not a cycle: use it to steer and to compare two
# binaries, and `scripts/bench.sh` for the CPU-time ratios the issues ask for.
#
#   benches/instructions.sh BIN VARIANT LUA [SECONDS]
#
#   VARIANT  off: the plain route (benches/proxies/ringway-sse-off.toml)
#            on:  the AI chain key-auth + token-limit + cost-limit + ai-stats
#                 (benches/proxies/ringway-budget-on.toml)
#   LUA      benches/wrk/chat.lua (non-streamed JSON) or benches/wrk/sse.lua (200 frames)
#
# One worker on the epoll driver (valgrind does not know io_uring), the origin
# benches/backend/sse_backend.py, wrk -c8 for 2 s of warm-up, counters zeroed, then SECONDS (4)
# measured; prints instructions / requests completed. Needs valgrind and wrk. With KEEP=DIR the
# callgrind files are copied there (for callgrind_annotate); CG_OPTS adds callgrind options
# (`--dump-instr=yes` for per-instruction costs).
set -euo pipefail
BIN=$1 VARIANT=$2 LUA=$3 SECS=${4:-4}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] && cp "$WORK"/cg.* "$KEEP"/ 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
. "$ROOT/benches/ab_route.sh"
sed -e "s/@WORKERS@/1/; s/@PORT@/$port/; s/@UPSTREAM_PORT@/$up/" \
    -e 's/^\[server\]/[server]\ndriver = "epoll"/' "$tmpl" > "$WORK/ringway.toml"
valgrind --tool=callgrind ${CG_OPTS:-} --compress-strings=no --callgrind-out-file="$WORK/cg.%p" "$BIN" --conf "$WORK/ringway.toml" \
  > "$WORK/ringway.log" 2>&1 &
rw=$!
pids+=($rw)
wait_port "$port"
url="http://127.0.0.1:$port/v1/chat/completions"
wrk -t1 -c8 -d2s -s "$LUA" "$url" > /dev/null
callgrind_control -z "$rw" > /dev/null 2>&1
wrk -t1 -c8 -d"${SECS}s" -s "$LUA" "$url" > "$WORK/wrk.out"
callgrind_control -d "$rw" > /dev/null 2>&1
n=$(grep -oE '^ *[0-9]+ requests' "$WORK/wrk.out" | grep -oE '[0-9]+')
ir=$(grep -hE '^(summary|totals):' "$WORK"/cg.*.1 | tail -1 | awk '{print $2}')
awk -v i="$ir" -v n="$n" -v b="$BIN" -v v="$VARIANT" -v l="$(basename "$LUA")" \
  'BEGIN { printf "%s %s %s: %d requests, %.0f instructions per request\n", b, v, l, n, i / n }'

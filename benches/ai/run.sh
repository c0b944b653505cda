#!/usr/bin/env bash
# AI-gateway benchmark (issue 13): Ringway vs LiteLLM's proxy vs nginx vs direct, all in front of
# the SAME mock OpenAI-compatible provider (benches/ai/tools: `aibench mock`).
#
#   benches/ai/run.sh [--rounds R] [--duration S] [--rates LIST] [--streams N] [--only LIST]
#                     [--targets LIST] [--stream-timeout S] [--ringway PATH] [--out DIR]
#
# Targets (--targets, comma list): direct (the mock itself), ringway (an AI route: key-auth +
# ai-stats, benches/ai/ringway-ai.toml), ringway-plain (a route without filters, for reference),
# nginx (benches/ai/nginx-ai.conf, proxy_buffering off), litellm (LiteLLM proxy, one worker, no
# database, benches/ai/litellm.yaml). One worker each; Ringway's upstream keeps its DEFAULT pool
# settings (no max_connections).
#
# Scenarios (--only, comma list):
#   rates    non-streamed chat completions at fixed OPEN-LOOP rates (default 100,500,1000,2000 req/s;
#            benches/ai/loadgen.py): 1 s warm-up at the rate, then S (5) s measured. Latency
#            p50/p99 (added = target - direct, medians over rounds), achieved rate, non-200,
#            errors, timeouts (5 s), CPU µs per request of the gateway process tree.
#   streams  N (2000) streamed chat completions opened together (`aibench streams`), each 50 SSE
#            chunks 20 ms apart: time to first chunk (p50/p99, added over direct), CPU µs per
#            1,000 chunks, RSS per open stream ((RSS at the most streams open - idle RSS) / open
#            streams), every non-200 counted. A stream not done after --stream-timeout (30) s
#            counts as a timeout.
#
# Order: for each round, for each rate (or the stream test), the targets interleaved; every run
# on a freshly started gateway (LiteLLM too: after an overload it works through its backlog for
# minutes). Before each run one curl checks the answer (200 + usage, or 50 chunks + [DONE]); after
# each Ringway run its /metrics must show the tokens counted.
#
# Pinning (2+ cores): the gateway on core 1; the mock and the load generator share core 0.
# Output: bench-out/ai-<timestamp>.md (report) and .tsv (every run); the report also on stdout.
# Needs: nginx, taskset, curl, python3, cargo. The LiteLLM venv ($AI_BENCH_VENV, default
# .bench-venv in the repository, git-ignored) is created on first use with
# `pip install 'litellm[proxy]==LITELLM_VERSION' uvloop` (network needed once).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AI="$ROOT/benches/ai"
ROUNDS=3
DURATION=5
WARMUP=1
RATES="100,500,1000,2000"
STREAMS=2000
CHUNKS=50
INTERVAL_MS=20
STREAM_TIMEOUT=30
TARGETS="direct,ringway,ringway-plain,nginx,litellm"
ONLY="rates,streams"
OUTDIR="$ROOT/bench-out"
RINGWAY_SRC="${RINGWAY_BIN:-}"
VENV="${AI_BENCH_VENV:-$ROOT/.bench-venv}"
LITELLM_VERSION="${LITELLM_VERSION:-1.108.7}"
CMDLINE="benches/ai/run.sh $*"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --rates) RATES="$2"; shift 2 ;;
    --streams) STREAMS="$2"; shift 2 ;;
    --stream-timeout) STREAM_TIMEOUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --targets) TARGETS="$2"; shift 2 ;;
    --ringway) RINGWAY_SRC="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ai-bench: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

T0_RUN=$(date +%s)
log() { printf 'ai-bench [%4ds]: %s\n' "$(( $(date +%s) - T0_RUN ))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
has_target() { case ",$TARGETS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
IFS=, read -r -a RATE_LIST <<<"$RATES"

for c in nginx taskset curl python3 cargo; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || die "$c not found"
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# ------------------------------------------------------------------ the Ringway binary, first
if [ -z "$RINGWAY_SRC" ]; then RINGWAY_SRC="$ROOT/target/release/ringway"; fi
[ -x "$RINGWAY_SRC" ] || die "no ringway binary at $RINGWAY_SRC (cargo build --release, or --ringway PATH)"
WORK="$(mktemp -d /tmp/ringway-ai-bench.XXXXXX)"
chmod 755 "$WORK"
mkdir -p "$WORK/bin"
# Copied before anything else: target/ may be rebuilt while the benchmark runs.
cp "$RINGWAY_SRC" "$WORK/bin/ringway"
RINGWAY="$WORK/bin/ringway"
RINGWAY_SUM="$(sha256sum "$RINGWAY" | cut -c1-12)"
RINGWAY_BUILT="$(date -u -r "$RINGWAY_SRC" '+%Y-%m-%d %H:%M UTC')"
RINGWAY_VERSION="$("$RINGWAY" --version 2>&1 | head -1 || true)"
GIT_HEAD="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
GIT_DIRTY="$(git -C "$ROOT" status --porcelain -- engine filters Cargo.toml Cargo.lock 2>/dev/null | wc -l)"

declare -A LIVE=()
cleanup() {
  local rc=$? p
  trap - ERR
  set +e
  for p in "${!LIVE[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${!LIVE[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  wait 2>/dev/null
  # A failed run keeps its logs.
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$rc" != 0 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
set -E
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ tools: mock + stream client, venv
log "building benches/ai/tools (aibench)"
CARGO_TARGET_DIR="$ROOT/target/aibench-tools" cargo build --release --quiet \
  --manifest-path "$AI/tools/Cargo.toml" || die "cargo build of benches/ai/tools failed"
cp "$ROOT/target/aibench-tools/release/aibench" "$WORK/bin/aibench"
AIBENCH="$WORK/bin/aibench"

if has_target litellm || [ ! -x "$VENV/bin/python" ]; then
  if ! "$VENV/bin/python" -c 'import litellm, uvloop' >/dev/null 2>&1; then
    log "creating $VENV: pip install 'litellm[proxy]==$LITELLM_VERSION' uvloop (once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "litellm[proxy]==$LITELLM_VERSION" uvloop
  fi
fi
PY="$VENV/bin/python"
"$PY" -c 'import uvloop' 2>/dev/null || PY=python3   # loadgen.py runs on plain asyncio too
LITELLM_VER="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || echo none)"

# ------------------------------------------------------------------ limits, pinning, ports
HARD_NOFILE="$(ulimit -Hn)"; [ "$HARD_NOFILE" = unlimited ] && HARD_NOFILE=1048576
ulimit -n "$HARD_NOFILE" 2>/dev/null || true
NOFILE="$(ulimit -n)"
[ "$NOFILE" -ge $((STREAMS * 2 + 500)) ] || die "ulimit -n is $NOFILE; $STREAMS streams need $((STREAMS * 2 + 500))"
NCPU="$(nproc)"
if [ "$NCPU" -ge 2 ]; then
  PIN_LOAD=(taskset -c 0); PIN_GW=(taskset -c 1)
  PIN_NOTE="gateway on core 1; mock provider and load generator together on core 0 (taskset)"
else
  PIN_LOAD=(); PIN_GW=()
  PIN_NOTE="NO pinning: 1 core"
fi
read -r PORT_MOCK PORT_GW PORT_ADMIN <<<"$(python3 "$ROOT/benches/benchlib.py" freeports 3)"

fill() { # template -> output
  sed -e "s|@DIR@|$3|g" -e "s|@PORT@|$PORT_GW|g" -e "s|@MOCK_PORT@|$PORT_MOCK|g" \
      -e "s|@ADMIN_PORT@|$PORT_ADMIN|g" -e "s|@NOFILE@|$NOFILE|g" "$1" > "$2"
}

wait_http() { # url timeout_s: 200 with the key
  local i
  for i in $(seq $(( $2 * 10 ))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H 'Authorization: Bearer sk-bench' "$1" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

# ------------------------------------------------------------------ the mock provider (whole run)
"${PIN_LOAD[@]}" "$AIBENCH" mock --port "$PORT_MOCK" --chunks "$CHUNKS" --interval-ms "$INTERVAL_MS" > "$WORK/mock.log" 2>&1 &
MOCK_PID=$!; LIVE[$MOCK_PID]=1
wait_http "http://127.0.0.1:$PORT_MOCK/health" 10 || { cat "$WORK/mock.log" >&2; die "mock did not start"; }

# ------------------------------------------------------------------ gateways
TPID="" TPORT="" CUR=""
start_target() { # name
  local t="$1" d="$WORK/$1"
  CUR="$t"
  mkdir -p "$d"
  case "$t" in
    direct) TPID="$MOCK_PID"; TPORT="$PORT_MOCK"; return 0 ;;
    ringway) fill "$AI/ringway-ai.toml" "$d/ringway.toml" "$d"
      "${PIN_GW[@]}" "$RINGWAY" --conf "$d/ringway.toml" >> "$d/log" 2>&1 & ;;
    ringway-plain) fill "$AI/ringway-plain.toml" "$d/ringway.toml" "$d"
      "${PIN_GW[@]}" "$RINGWAY" --conf "$d/ringway.toml" >> "$d/log" 2>&1 & ;;
    nginx) mkdir -p "$d/client_body" "$d/proxy" "$d/fastcgi" "$d/uwsgi" "$d/scgi"; chmod 755 "$d"
      fill "$AI/nginx-ai.conf" "$d/nginx.conf" "$d"
      "${PIN_GW[@]}" "$NGINX" -p "$d" -e "$d/error.log" -c "$d/nginx.conf" >> "$d/log" 2>&1 & ;;
    litellm) fill "$AI/litellm.yaml" "$d/litellm.yaml" "$d"
      (cd "$d" && exec env LITELLM_LOG=ERROR LITELLM_LOCAL_MODEL_COST_MAP=True "${PIN_GW[@]}" \
        "$VENV/bin/litellm" --config "$d/litellm.yaml" --host 127.0.0.1 --port "$PORT_GW" --num_workers 1) >> "$d/log" 2>&1 & ;;
    *) die "unknown target $t" ;;
  esac
  TPID=$!; TPORT="$PORT_GW"; LIVE[$TPID]=1
  local limit=10; [ "$t" = litellm ] && limit=90
  # Right after a 2,000-stream round, the previous gateway's listening socket can outlive its
  # process for a moment (seen: "cannot bind ... Address already in use" once in a few runs,
  # with no process left on the port): such a start is retried, and noted as an anomaly.
  local tries=0
  case "$t" in ringway*) sleep 0.2 ;; esac
  while case "$t" in ringway*) true ;; *) false ;; esac && [ $tries -lt 5 ] &&
        ! kill -0 "$TPID" 2>/dev/null && tail -1 "$d/log" 2>/dev/null | grep -q "cannot bind"; do
    tries=$((tries + 1))
    echo "- $t could not bind port $PORT_GW at start ($SCEN), retried after 1 s" >> "$WORK/anomalies"
    sleep 1
    "${PIN_GW[@]}" "$RINGWAY" --conf "$d/ringway.toml" >> "$d/log" 2>&1 &
    TPID=$!; LIVE[$TPID]=1
    sleep 0.2
  done
  if ! wait_http "http://127.0.0.1:$PORT_GW/v1/models" "$limit"; then
    tail -20 "$d/log" "$d/error.log" >&2 2>/dev/null || true
    die "$t did not answer 200 on /v1/models"
  fi
}

stop_target() {
  [ "$CUR" = direct ] && return 0
  local p="$TPID" i
  # LiteLLM is killed outright: after an overload its graceful shutdown waits for a backlog that
  # is of no interest here, and nothing of it is measured.
  if [ "$CUR" = litellm ]; then kill -KILL "$p" 2>/dev/null || true; else kill -TERM "$p" 2>/dev/null || true; fi
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$p" 2>/dev/null; then
    echo "- $CUR did not exit within 5 s of SIGTERM ($SCEN) and was killed" >> "$WORK/anomalies"
    kill -KILL "$p" 2>/dev/null || true
  fi
  { wait "$p"; } 2>/dev/null || true
  unset "LIVE[$p]"
}

ai_metrics() { # "AI requests counted, tokens counted" from Ringway's /metrics ("- -" elsewhere)
  case "$CUR" in
    ringway|ringway-plain)
      curl -s --max-time 5 "http://127.0.0.1:$PORT_ADMIN/metrics" | awk '
        /^ringway_ai_requests_total/ { r += $NF } /^ringway_ai_tokens_total/ { t += $NF }
        END { printf "%d %d\n", r, t }' ;;
    *) echo "- -" ;;
  esac
}

BODY_CHAT='{"model":"gpt-mock","max_tokens":64,"messages":[{"role":"user","content":"Say hello to the benchmark, in one short sentence."}]}'
BODY_STREAM='{"model":"gpt-mock","stream":true,"max_tokens":64,"messages":[{"role":"user","content":"Stream a short answer to the benchmark."}]}'
check_once() { # chat|stream: one request through the target; prints ok or what was wrong
  local kind="$1" code body=$BODY_CHAT
  [ "$kind" = stream ] && body=$BODY_STREAM
  code=$(curl -sN -o "$WORK/check.body" -w '%{http_code}' --max-time 20 -H 'Content-Type: application/json' \
    -H 'Authorization: Bearer sk-bench' --data-binary "$body" "http://127.0.0.1:$TPORT/v1/chat/completions" || echo 000)
  if [ "$kind" = chat ]; then
    if [ "$code" = 200 ] && grep -q '"total_tokens":49' "$WORK/check.body"; then echo ok; else echo "status-$code-or-no-usage"; fi
  else
    local n; n=$(grep -o '"delta"' "$WORK/check.body" | wc -l)
    if [ "$code" = 200 ] && [ "$n" -ge "$CHUNKS" ] && grep -q '^data: \[DONE\]' "$WORK/check.body"; then echo ok; else echo "status-$code-$n-chunks"; fi
  fi
}

RESULTS="$WORK/results.tsv"
: > "$RESULTS"; : > "$WORK/anomalies"
record() { # scenario target round rate check metrics json
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RESULTS"
}

run_rates() {
  want rates || return 0
  SCEN=rates
  local r rate t
  for r in $(seq "$ROUNDS"); do
    for rate in "${RATE_LIST[@]}"; do
      for t in "${TARGET_LIST[@]}"; do
        start_target "$t"
        local chk; chk=$(check_once chat)
        [ "$chk" = ok ] || echo "- $t rate $rate round $r: check $chk" >> "$WORK/anomalies"
        local js
        js=$("${PIN_LOAD[@]}" "$PY" "$AI/loadgen.py" rate --port "$TPORT" --rate "$rate" --duration "$DURATION" \
          --warmup "$WARMUP" --timeout 5 --pids "$TPID") || js='{}'
        local m; m=$(ai_metrics)
        kill -0 "$TPID" 2>/dev/null || { echo "- $t died during rate $rate round $r" >> "$WORK/anomalies"; chk=died; }
        stop_target
        record rates "$t" "$r" "$rate" "$chk" "$m" "$js"
        log "rates r$r $rate/s $t: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); l=d.get("latency",{}); print("achieved %s ok %s p50 %s p99 %s ms cpu %s us/req timeouts %s errors %s lag-p99 %s" % (d.get("achieved_rps"), d.get("ok"), l.get("p50_ms"), l.get("p99_ms"), d.get("cpu_us_per_req"), d.get("timeouts"), d.get("errors"), d.get("lag",{}).get("p99_ms")))' "$js") [$chk; ai $m]"
      done
    done
  done
}

stream_summary() { # aibench streams json -> one line
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); t=d.get("ttft",{}); print("status %s errors %s ttft p50 %s p99 %s ms cpu %s us/1000 chunks %s B/open stream (max open %s) wall %s s" % (d.get("status"), d.get("errors"), t.get("p50_ms"), t.get("p99_ms"), d.get("cpu_us_per_1000_chunks"), d.get("bytes_per_open_stream"), d.get("max_open"), d.get("wall_s")))' "$1"
}

run_streams() {
  want streams || return 0
  SCEN=streams
  local r t
  for r in $(seq "$ROUNDS"); do
    for t in "${TARGET_LIST[@]}"; do
      start_target "$t"
      local chk; chk=$(check_once stream)
      [ "$chk" = ok ] || echo "- $t streams round $r: check $chk" >> "$WORK/anomalies"
      # warm-up: 50 streams (about 1 s), then the idle RSS is read by aibench just before t0
      "${PIN_LOAD[@]}" "$AIBENCH" streams --port "$TPORT" --streams 50 --chunks "$CHUNKS" --timeout 20 > "$WORK/warm.out" 2>&1 || true
      sleep 0.5
      local js
      js=$("${PIN_LOAD[@]}" "$AIBENCH" streams --port "$TPORT" --streams "$STREAMS" --chunks "$CHUNKS" \
        --timeout "$STREAM_TIMEOUT" --pids "$TPID") || js='{}'
      local m; m=$(ai_metrics)
      record streams "$t" "$r" "$STREAMS" "$chk" "$m" "$js"
      log "streams r$r $t: $(stream_summary "$js") [$chk; ai $m]"
      # The same burst again on the same process (buffers, allocator and upstream pool warm).
      # Not for LiteLLM: its first burst does not finish within the time limit.
      if [ "$t" != litellm ]; then
        sleep 1
        js=$("${PIN_LOAD[@]}" "$AIBENCH" streams --port "$TPORT" --streams "$STREAMS" --chunks "$CHUNKS" \
          --timeout "$STREAM_TIMEOUT" --pids "$TPID") || js='{}'
        local m2; m2=$(ai_metrics)
        record streams-again "$t" "$r" "$STREAMS" "$chk" "$m2" "$js"
        log "streams-again r$r $t: $(stream_summary "$js") [ai $m2]"
      fi
      kill -0 "$TPID" 2>/dev/null || { echo "- $t died during streams round $r" >> "$WORK/anomalies"; }
      stop_target
    done
  done
}

mkdir -p "$OUTDIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
START_TS="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
T_START=$(date +%s)
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "work dir $WORK; ringway $RINGWAY_SUM (HEAD $GIT_HEAD); ports mock $PORT_MOCK gateway $PORT_GW; $PIN_NOTE"
run_rates
run_streams
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
WALL=$(( $(date +%s) - T_START ))

META="$WORK/meta.md"
{
  echo "## AI gateway benchmark — $START_TS"
  echo
  echo "- command: \`$CMDLINE\` ($ROUNDS round(s); rates $RATES req/s, ${WARMUP} s warm-up + ${DURATION} s measured each; $STREAMS streams x $CHUNKS chunks ${INTERVAL_MS} ms apart; wall time $((WALL / 60)) min $((WALL % 60)) s)"
  echo "- machine: $NCPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; ulimit -n $NOFILE"
  echo "- load average (1/5/15 min) before: $LOAD_BEFORE, after: $LOAD_AFTER"
  echo "- pinning: $PIN_NOTE"
  echo "- ringway: $RINGWAY_SRC ($RINGWAY_VERSION, sha256 $RINGWAY_SUM, built $RINGWAY_BUILT); this checkout's HEAD $GIT_HEAD when the run started$([ "$GIT_DIRTY" -gt 0 ] && echo " (uncommitted changes in engine/, filters/ or Cargo files: $GIT_DIRTY paths)")"
  echo "- $("$NGINX" -v 2>&1); LiteLLM $LITELLM_VER ($VENV, uvicorn $("$VENV/bin/python" -c 'import uvicorn; print(uvicorn.__version__)' 2>/dev/null || echo '?')); load generator $PY benches/ai/loadgen.py ($("$PY" -c 'import uvloop; print("uvloop", uvloop.__version__)' 2>/dev/null || echo asyncio)); mock and stream client benches/ai/tools (Rust, mio)"
  if [ -s "$WORK/anomalies" ]; then echo; echo "**Anomalies:**"; echo; cat "$WORK/anomalies"; else echo "- anomalies: none (every check passed, every gateway exited on SIGTERM)"; fi
} > "$META"

cp "$RESULTS" "$OUTDIR/ai-$STAMP.tsv"
python3 "$AI/report.py" "$RESULTS" "$META" | tee "$OUTDIR/ai-$STAMP.md"
log "written $OUTDIR/ai-$STAMP.md"

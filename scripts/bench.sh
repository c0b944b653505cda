#!/usr/bin/env bash
# Ringway vs nginx vs HAProxy, the same nginx origin behind each.
#
#   scripts/bench.sh [--quick] [--rounds R] [--duration S] [--workers N] [--backend-workers N]
#                    [--only LIST] [--idle N] [--tls-idle N] [--ringway PATH] [--out DIR]
#
# Scenarios (--only takes a comma list of these names):
#   small64    GET /hello (13-byte body), wrk -c64
#   small1000  GET /hello, wrk -c1000
#   resp16k    GET /16k (16 KiB body), wrk -c64
#   resp1m     GET /1m (1 MiB body), wrk -c64
#   post64k    POST /upload with a 64 KiB body (benches/wrk/post64k.lua), wrk -c64
#   download1g GET a 1 GiB file with curl through each proxy and direct, R runs each
#   idle       open N (10000) idle keep-alive connections, RSS before/after -> bytes per connection
#   ratelimit  Ringway vs itself: GET /hello with `Authorization: Bearer sk-bench`, wrk -c64, through
#              a route with key-auth + a cluster-scope rate limit (own redis-server, never rejects)
#              ("on") vs the same route without filters ("off"); + Redis commands and CPU per request
#   sse        Ringway vs itself: POST /v1/chat/completions (benches/wrk/sse.lua), wrk -c64, to an
#              OpenAI-style SSE origin (benches/backend/sse_backend.py: 200 frames + usage + [DONE],
#              chunked) through a plain route ("off") vs an AI route with key-auth + token-limit
#              (local) + ai-stats ("on"), and "on-usage" (same AI route, client sends
#              stream_options.include_usage); CPU per frame = CPU per request / frames per response.
#              The origin writes each response at once: ~200 frames per read, the worst case for
#              a proxy that reads every frame relative to one that does not
#   ssepaced   the same A/B with the origin writing one frame per write, SSE_PACE_MS (1) apart, as
#              a model streaming tokens does: about one frame per read; "budget-on" is the budget
#              scenario's whole chain (adds the cost-limit) on the same paced origin
#   budget     Ringway vs itself: the whole AI filter chain (key-auth + token-limit + cost-limit +
#              ai-stats, budgets that never reject) vs the plain route, streamed (sse.lua) and not
#              (chat.lua: the same origin answers a JSON chat.completion without "stream":true)
#
# TLS termination (not in the default list; ask with --only tls-small,tls-handshake,tls-1m,tls-idle).
# Client <-> proxy is TLS 1.3, TLS_AES_128_GCM_SHA256, X25519, ECDSA P-256 certificate made at run
# time with `openssl` in the temp dir (never kept); proxy <-> origin stays plain. nginx and HAProxy
# pin suite and group in their configs (benches/proxies/*-tls.*); Ringway has no such setting
# (rustls follows the client's order, and an OpenSSL client lists AES-256-GCM first), so every
# CLIENT (wrk, openssl, curl probes, Python) runs with OPENSSL_CONF pinning TLS 1.3 + that suite +
# X25519. Before the runs, `openssl s_client` records what each proxy negotiates (pinned and
# default client) and benchlib.py tls-resume whether it resumes sessions.
#   tls-small      GET /hello over TLS keep-alive, wrk -c64
#   tls-handshake  GET /hello with `Connection: close`, wrk -c64: one handshake per request. wrk 4.1
#                  keeps the session across its reconnects (SSL_clear), so these are RESUMED
#                  handshakes (PSK + X25519, no certificate signature) on every proxy that issues
#                  tickets (all three do); also measured as tls-handshake-new: FULL handshakes with
#                  STIME_CLIENTS (4) parallel `openssl s_time -new -www /hello` (HTTP/1.0, one GET per
#                  connection), connections/s and CPU µs per connection
#   tls-1m         GET /1m (1 MiB body) over TLS keep-alive, wrk -c64
#   tls-idle       open TLS_IDLE_N (2000, --tls-idle N) idle TLS keep-alive connections (handshake +
#                  one GET /hello each, Python ssl): RSS before/after -> bytes per connection
#
# ratelimit/sse run the variants interleaved (off on [on-usage], off on ...) for R rounds, medians,
# each run on a freshly started Ringway; ratios are on / off.
#
# Every wrk scenario runs the proxies interleaved (ringway nginx haproxy, ringway nginx haproxy, ...)
# for R rounds; each run starts the proxy afresh, checks one request with curl (status and exact
# byte count), warms up for 1 s, then measures one `wrk -t1 -cC -dD --latency` run. Reported are
# the MEDIANS over rounds of req/s, p50/p99 latency, CPU µs per request (proxy user+sys from
# /proc/PID/stat utime+stime, all threads and all its processes, / CLK_TCK / requests served),
# and peak RSS (VmHWM summed over the proxy's processes), with ratios to nginx. Runs with non-2xx
# responses, socket errors or short bodies are flagged.
#
# Output: markdown on stdout and in bench-out/<timestamp>.md (raw numbers in bench-out/<timestamp>.tsv).
# Needs: nginx, haproxy, wrk, curl, python3, taskset (+ redis-server, redis-cli for ratelimit; openssl for tls-*). The Ringway binary: --ringway PATH, or
# $RINGWAY_BIN, or target/release/ringway, or /work/bin/ringway (copied to the temp dir first).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCHES="$ROOT/benches"
LIB="$BENCHES/benchlib.py"

ROUNDS=3
DURATION=5
WARMUP=1
WORKERS=1
BACKEND_WORKERS=""
ONLY="small64,small1000,resp16k,resp1m,post64k,download1g,idle,ratelimit,sse,ssepaced,budget"
SSE_FRAMES=200
SSE_FRAME_BYTES=150
SSE_PACE_MS="${SSE_PACE_MS:-1}"
IDLE_N=10000
TLS_IDLE_N=2000
STIME_CLIENTS="${STIME_CLIENTS:-4}"
QUICK=0
OUTDIR="$ROOT/bench-out"
RINGWAY_SRC="${RINGWAY_BIN:-}"
CMDLINE="scripts/bench.sh $*"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; ROUNDS=1; DURATION=2; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --backend-workers) BACKEND_WORKERS="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --idle) IDLE_N="$2"; shift 2 ;;
    --tls-idle) TLS_IDLE_N="$2"; shift 2 ;;
    --ringway) RINGWAY_SRC="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
want_tls() { want tls-small || want tls-handshake || want tls-1m || want tls-idle; }

TOOLS="nginx haproxy wrk curl python3 taskset"
if want_tls; then TOOLS="$TOOLS openssl"; fi
for c in $TOOLS; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || die "$c not found"
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"

if [ -z "$RINGWAY_SRC" ]; then
  # This checkout's build first: a stale copy elsewhere must never be measured by default.
  for c in "$ROOT/target/release/ringway" /work/bin/ringway; do
    if [ -x "$c" ]; then RINGWAY_SRC="$c"; break; fi
  done
fi
[ -n "$RINGWAY_SRC" ] && [ -x "$RINGWAY_SRC" ] || die "no ringway binary (use --ringway PATH)"

# ------------------------------------------------------------------ temp dir, cleanup
WORK="$(mktemp -d /tmp/ringway-bench.XXXXXX)"
chmod 755 "$WORK"   # nginx workers run as nobody when started by root
declare -A LIVE=()   # pids this script started and has not reaped yet
cleanup() {
  local rc=$?
  set +e
  local p
  for p in "${!LIVE[@]}"; do
    if kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null; fi
  done
  for p in "${!LIVE[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
  done
  wait 2>/dev/null
  if [ "${KEEP_WORK:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
set -E
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM

TLS_DIR="$WORK/tls"   # @TLS_DIR@: certificate and key made at run time (tls-* scenarios)
mkdir -p "$WORK/bin"; cp "$RINGWAY_SRC" "$WORK/bin/ringway"
RINGWAY="$WORK/bin/ringway"
RINGWAY_VERSION="$("$RINGWAY" --version 2>&1 | awk 'NR == 1' || true)"
RINGWAY_SUM="$(sha256sum "$RINGWAY" | cut -c1-12)"

# ------------------------------------------------------------------ limits, cores, pinning
HARD_NOFILE="$(ulimit -Hn)"
if [ "$HARD_NOFILE" = unlimited ]; then HARD_NOFILE=1048576; fi
ulimit -n "$HARD_NOFILE" 2>/dev/null || true
NOFILE="$(ulimit -n)"
if [ "$NOFILE" -lt 2200 ]; then die "ulimit -n is $NOFILE; -c1000 needs more (raise the hard limit)"; fi
if [ $((IDLE_N + 300)) -gt "$NOFILE" ]; then
  log "ulimit -n $NOFILE: idle connections lowered from $IDLE_N to $((NOFILE - 300))"
  IDLE_N=$((NOFILE - 300))
fi
# HAProxy refuses to start unless 2 * maxconn + 14 fds fit under the hard limit, and it refuses
# connections beyond maxconn, so the idle count must fit under its maxconn (same count for all).
HAPROXY_MAXCONN=$(( (NOFILE - 14) / 2 ))
if [ $((IDLE_N + 50)) -gt "$HAPROXY_MAXCONN" ]; then
  log "ulimit -n $NOFILE: HAProxy maxconn is $HAPROXY_MAXCONN; idle connections lowered from $IDLE_N to $((HAPROXY_MAXCONN - 50))"
  IDLE_N=$((HAPROXY_MAXCONN - 50))
fi
if [ $((TLS_IDLE_N + 50)) -gt "$HAPROXY_MAXCONN" ]; then
  log "ulimit -n $NOFILE: TLS idle connections lowered from $TLS_IDLE_N to $((HAPROXY_MAXCONN - 50))"
  TLS_IDLE_N=$((HAPROXY_MAXCONN - 50))
fi

NCPU="$(nproc)"
CLK_TCK="$(getconf CLK_TCK)"
PROXY_CPUS="" WRK_CPUS="" BACKEND_CPUS=""
if [ "$NCPU" -ge 4 ] && [ $((WORKERS + 2)) -le "$NCPU" ]; then
  PROXY_CPUS="0-$((WORKERS - 1))"
  WRK_CPUS="$WORKERS"
  BACKEND_CPUS="$((WORKERS + 1))-$((NCPU - 1))"
  : "${BACKEND_WORKERS:=$(( NCPU - WORKERS - 1 > 4 ? 4 : NCPU - WORKERS - 1 ))}"
  PIN_NOTE="proxy on cores $PROXY_CPUS, wrk/curl on core $WRK_CPUS, backend on cores $BACKEND_CPUS (taskset)"
else
  : "${BACKEND_WORKERS:=1}"
  PIN_NOTE="NO pinning: $NCPU cores (< 4 or fewer than workers+2), so proxy, wrk and backend share cores"
fi
# Command prefixes (taskset execs, so $! of a backgrounded command is the program's own pid).
PIN_PROXY=() PIN_WRK=() PIN_BACKEND=()
if [ -n "$PROXY_CPUS" ]; then
  PIN_PROXY=(taskset -c "$PROXY_CPUS"); PIN_WRK=(taskset -c "$WRK_CPUS"); PIN_BACKEND=(taskset -c "$BACKEND_CPUS")
fi

read -r PORT_BACKEND PORT_RINGWAY PORT_NGINX PORT_HAPROXY PORT_REDIS PORT_SSE PORT_SSE_PACED <<<"$(python3 "$LIB" freeports 7)"
UPSTREAM_PORT="$PORT_BACKEND"   # @UPSTREAM_PORT@ in the A/B Ringway configs (nginx backend or SSE origin)
declare -A PORT=([ringway]=$PORT_RINGWAY [nginx]=$PORT_NGINX [haproxy]=$PORT_HAPROXY [direct]=$PORT_BACKEND)

fill() { # template -> output, substituting @NAME@ placeholders
  sed -e "s|@DIR@|$3|g" -e "s|@PORT@|$4|g" -e "s|@BACKEND_PORT@|$PORT_BACKEND|g" \
      -e "s|@WORKERS@|$WORKERS|g" -e "s|@BACKEND_WORKERS@|$BACKEND_WORKERS|g" \
      -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@REDIS_PORT@|$PORT_REDIS|g" \
      -e "s|@NOFILE@|$NOFILE|g" -e "s|@MAXCONN@|$HAPROXY_MAXCONN|g" -e "s|@TLS_DIR@|$TLS_DIR|g" "$1" > "$2"
}

PROBE_ARGS=()   # extra curl arguments for wait_http (the A/B scenarios' Authorization header; -k for TLS)
SCHEME=http     # https in the tls-* scenarios (proxy URLs of wait_http, check_once and wrk)
CLIENT_ENV=()   # prefix for the load clients: `env OPENSSL_CONF=...` in the tls-* scenarios
WRK_EXTRA=()    # extra wrk arguments (tls-handshake: -H 'Connection: close')
RINGWAY_TMPL="$BENCHES/proxies/ringway.toml" NGINX_TMPL="$BENCHES/proxies/nginx-proxy.conf" HAPROXY_TMPL="$BENCHES/proxies/haproxy.cfg"
wait_http() { # url, timeout seconds
  local i
  for i in $(seq $(( $2 * 20 ))); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 ${PROBE_ARGS[@]+"${PROBE_ARGS[@]}"} "$1" 2>/dev/null)" = 200 ]; then return 0; fi
    sleep 0.05
  done
  return 1
}

# ------------------------------------------------------------------ backend
start_backend() {
  local d="$WORK/backend"
  mkdir -p "$d/www" "$d/client_body" "$d/proxy" "$d/fastcgi" "$d/uwsgi" "$d/scgi"
  head -c 16384 /dev/urandom > "$d/www/16k"
  head -c 1048576 /dev/urandom > "$d/www/1m"
  if want download1g; then
    # Real bytes (not a hole) so sendfile/splice move data; `yes` is fast and not all zeros.
    { yes 'ringway bench 1 GiB payload' || true; } | head -c 1073741824 > "$d/www/1g"
  fi
  : > "$d/www/upload"
  chmod -R a+rX "$d"
  fill "$BENCHES/backend/nginx-backend.conf" "$d/nginx-backend.conf" "$d" ""
  "${PIN_BACKEND[@]}" "$NGINX" -p "$d" -e "$d/error.log" -c "$d/nginx-backend.conf" >"$d/stdout" 2>&1 &
  BACKEND_PID=$!
  LIVE[$BACKEND_PID]=1
  wait_http "http://127.0.0.1:$PORT_BACKEND/hello" 10 || { cat "$d/error.log" >&2; die "backend did not start"; }
  if want download1g; then cat "$d/www/1g" > /dev/null; fi   # into the page cache
}

# ------------------------------------------------------------------ proxies
PROXY_PID=""
start_proxy() { # name [ringway config template]
  local name="$1" d="$WORK/$1" port="${PORT[$1]}" tmpl="${2:-$RINGWAY_TMPL}"
  mkdir -p "$d" "$d/client_body" "$d/proxy" "$d/fastcgi" "$d/uwsgi" "$d/scgi"
  chmod 755 "$d"
  case "$name" in
    ringway)
      fill "$tmpl" "$d/ringway.toml" "$d" "$port"
      "${PIN_PROXY[@]}" "$RINGWAY" --conf "$d/ringway.toml" >>"$d/stdout" 2>&1 &
      ;;
    nginx)
      fill "$NGINX_TMPL" "$d/nginx-proxy.conf" "$d" "$port"
      "${PIN_PROXY[@]}" "$NGINX" -p "$d" -e "$d/error.log" -c "$d/nginx-proxy.conf" >>"$d/stdout" 2>&1 &
      ;;
    haproxy)
      fill "$HAPROXY_TMPL" "$d/haproxy.cfg" "$d" "$port"
      "${PIN_PROXY[@]}" "$HAPROXY" -db -f "$d/haproxy.cfg" >>"$d/stdout" 2>&1 &
      ;;
  esac
  PROXY_PID=$!
  LIVE[$PROXY_PID]=1
  if ! wait_http "${START_PROBE_URL:-$SCHEME://127.0.0.1:$port/hello}" 10; then
    tail -20 "$d/stdout" "$d/error.log" >&2 2>/dev/null || true
    die "$name did not answer 200 on /hello"
  fi
}

stop_proxy() {
  local p="$PROXY_PID" i
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$p" 2>/dev/null; then
    log "WARNING: $CUR_PROXY (pid $p) still running 5 s after SIGTERM; killing it"
    echo "- $CUR_PROXY did not exit within 5 s of SIGTERM during $CUR_SCEN (killed)" >> "$WORK/anomalies"
    kill -KILL "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
  unset "LIVE[$p]"
  PROXY_PID=""
}

proc_tree() { # pid and its direct children (nginx master + workers)
  echo "$1"
  ps -o pid= --ppid "$1" 2>/dev/null || true
}
cpu_ticks() { # user+sys ticks of the process (all threads) and its children processes
  local t=0 p v
  for p in $(proc_tree "$1"); do
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
mem_kb() { # VmHWM or VmRSS summed over the process tree
  local t=0 p v
  for p in $(proc_tree "$2"); do
    v=$(awk -v k="$1:" '$1 == k {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# ------------------------------------------------------------------ checks
# One request through the proxy: status 200 and exactly the expected number of body bytes.
check_once() { # name path expected_bytes [post]
  local url="$SCHEME://127.0.0.1:${PORT[$1]}$2" got
  if [ "${4:-}" = post ]; then
    got=$(curl -s -o "$WORK/check.body" -w '%{http_code} %{size_download}' --max-time 20 \
      --data-binary @"$WORK/post64k.bin" -H 'Content-Type: application/octet-stream' "$url" || echo "000 0")
  else
    got=$(curl -s -o "$WORK/check.body" -w '%{http_code} %{size_download}' --max-time 20 ${PROBE_ARGS[@]+"${PROBE_ARGS[@]}"} "$url" || echo "000 0")
  fi
  if [ "$got" != "200 $3" ]; then
    log "WARNING: $1 $2 returned '$got', expected '200 $3'"
    echo "- $1: one curl to $2 returned status/size '$got', expected '200 $3' (scenario $CUR_SCEN)" >> "$WORK/anomalies"
    return 1
  fi
}

# ------------------------------------------------------------------ scenarios
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
: > "$WORK/anomalies"
head -c 65536 /dev/zero | tr '\0' 'x' > "$WORK/post64k.bin"
PROXY_LIST=(ringway nginx haproxy)
CUR_PROXY="" CUR_SCEN=""

run_wrk_scenario() { # scen path conns body_bytes desc [lua]
  local scen="$1" path="$2" conns="$3" body="$4" desc="$5" lua="${6:-}" r p
  want "$scen" || return 0
  CUR_SCEN="$scen"
  log "scenario $scen: $desc ($ROUNDS round(s) x ${DURATION}s)"
  local args=(-t1 "-c$conns" "-d${DURATION}s" --latency --timeout 5s ${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"})
  [ -n "$lua" ] && args+=(-s "$lua")
  for r in $(seq "$ROUNDS"); do
    for p in "${PROXY_LIST[@]}"; do
      CUR_PROXY="$p"
      start_proxy "$p"
      local url="$SCHEME://127.0.0.1:${PORT[$p]}$path" check="ok"
      check_once "$p" "$path" "$body" ${lua:+post} || check="curl-check-failed"
      "${PIN_WRK[@]}" ${CLIENT_ENV[@]+"${CLIENT_ENV[@]}"} wrk -t1 "-c$conns" "-d${WARMUP}s" --timeout 5s ${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"} ${lua:+-s "$lua"} "$url" > "$WORK/warm.out" 2>&1 || true
      local t0 t1 out="$WORK/wrk-$scen-$p-$r.out"
      t0=$(cpu_ticks "$PROXY_PID")
      "${PIN_WRK[@]}" ${CLIENT_ENV[@]+"${CLIENT_ENV[@]}"} wrk "${args[@]}" "$url" > "$out" 2>&1 || log "wrk exited non-zero ($p, $scen)"
      t1=$(cpu_ticks "$PROXY_PID")
      local hwm; hwm=$(mem_kb VmHWM "$PROXY_PID")
      kill -0 "$PROXY_PID" 2>/dev/null || { echo "- $p died during $scen round $r" >> "$WORK/anomalies"; check="proxy-died"; }
      stop_proxy
      local req rps p50 p99 bytes non2 sock sockd
      IFS=$'\t' read -r req rps p50 p99 bytes non2 sock sockd < <(python3 "$LIB" parse-wrk "$out")
      local cpu_us
      cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { if (n > 0) printf "%.3f", d / hz * 1e6 / n; else print "nan" }')
      # Responses must carry the whole body: bytes read per request >= body size (heads add more).
      if [ "$check" = ok ] && [ "$body" -ge 16384 ] && [ -z "$lua" ]; then
        awk -v b="$bytes" -v n="$req" -v s="$body" 'BEGIN { exit !(n > 0 && b / n >= s * 0.99) }' || check="short-bodies"
      fi
      [ "$req" -gt 0 ] || check="no-requests"
      if [ "$non2" != 0 ] || [ "$sock" != 0 ] || [ "$check" != ok ]; then
        echo "- $p $scen round $r: non-2xx $non2, socket errors $sock ($sockd), check $check (wrk output: see raw table)" >> "$WORK/anomalies"
        cp "$out" "$OUTDIR/$STAMP-wrk-$scen-$p-$r.out" 2>/dev/null || true
      fi
      printf 'wrk\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$scen" "$p" "$r" "$req" "$rps" "$p50" "$p99" "$cpu_us" "$hwm" "$bytes" "$non2" "$sock" "$sockd" "$check" "$desc" >> "$RESULTS"
      log "  $scen r$r $p: $rps req/s p50 ${p50}ms p99 ${p99}ms cpu ${cpu_us}us/req hwm ${hwm}kB non2xx $non2 sockerr $sock $check"
    done
  done
}

run_download() {
  want download1g || return 0
  CUR_SCEN=download1g
  log "scenario download1g: 1 GiB GET with curl, $ROUNDS round(s), direct + 3 proxies"
  local r t
  for r in $(seq "$ROUNDS"); do
    for t in direct "${PROXY_LIST[@]}"; do
      CUR_PROXY="$t"
      local t0=0 t1=0 hwm=0
      if [ "$t" != direct ]; then start_proxy "$t"; t0=$(cpu_ticks "$PROXY_PID"); fi
      local res
      res=$("${PIN_WRK[@]}" curl -s -o /dev/null --max-time 120 -w '%{http_code} %{size_download} %{speed_download}' \
        "http://127.0.0.1:${PORT[$t]}/1g" || echo "000 0 0")
      if [ "$t" != direct ]; then
        t1=$(cpu_ticks "$PROXY_PID"); hwm=$(mem_kb VmHWM "$PROXY_PID"); stop_proxy
      fi
      local code size speed; read -r code size speed <<<"$res"
      local cpu_ms=$(( (t1 - t0) * 1000 / CLK_TCK ))
      if [ "$code" != 200 ] || [ "$size" != 1073741824 ]; then
        echo "- $t download1g round $r: status $code, $size bytes (expected 200, 1073741824)" >> "$WORK/anomalies"
      fi
      printf 'dl\tdownload1g\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$code" "$size" "$speed" "$cpu_ms" "$hwm" >> "$RESULTS"
      log "  download1g r$r $t: $code $size bytes $(awk -v s="$speed" 'BEGIN{printf "%.0f", s/1048576}') MiB/s cpu ${cpu_ms}ms hwm ${hwm}kB"
    done
  done
}

run_idle() { # [scenario N tls]: idle (default) or tls-idle
  local scen="${1:-idle}" n="${2:-$IDLE_N}" tls="${3:-}"
  want "$scen" || return 0
  CUR_SCEN="$scen"
  log "scenario $scen: $n idle ${tls:+TLS }keep-alive connections, $ROUNDS round(s)"
  local r p
  for r in $(seq "$ROUNDS"); do
    for p in "${PROXY_LIST[@]}"; do
      CUR_PROXY="$p"
      start_proxy "$p"
      local url="$SCHEME://127.0.0.1:${PORT[$p]}/hello"
      "${PIN_WRK[@]}" ${CLIENT_ENV[@]+"${CLIENT_ENV[@]}"} wrk -t1 -c64 -d1s "$url" > /dev/null 2>&1 || true   # warm pools and buffers
      sleep 0.5
      local before after ready="$WORK/idle.ready" ipid
      before=$(mem_kb VmRSS "$PROXY_PID")
      rm -f "$ready"
      "${PIN_WRK[@]}" ${CLIENT_ENV[@]+"${CLIENT_ENV[@]}"} python3 "$LIB" idle 127.0.0.1 "${PORT[$p]}" "$n" /hello "$ready" $tls > "$WORK/idle.out" 2>&1 &
      ipid=$!
      LIVE[$ipid]=1
      local i
      for i in $(seq 1200); do [ -f "$ready" ] && break; kill -0 "$ipid" 2>/dev/null || break; sleep 0.1; done
      sleep 1
      after=$(mem_kb VmRSS "$PROXY_PID")
      local opened=0 failed="$n" secs=0
      [ -f "$ready" ] && read -r opened failed secs < "$ready"
      kill -TERM "$ipid" 2>/dev/null || true
      wait "$ipid" 2>/dev/null || true
      unset "LIVE[$ipid]"
      local still; still=$(awk '/^idle:/ {print $7}' "$WORK/idle.out"); still=${still:-0}
      stop_proxy
      if [ "$failed" != 0 ] || [ "$still" != "$opened" ]; then
        echo "- $p $scen round $r: opened $opened, failed $failed, still open at the end $still" >> "$WORK/anomalies"
      fi
      printf 'idle\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$p" "$opened" "$failed" "$still" "$before" "$after" "$n" "$r" >> "$RESULTS"
      log "  $scen r$r $p: opened $opened failed $failed (${secs}s) still-open $still rss ${before}kB -> ${after}kB"
    done
  done
}

# ------------------------------------------------------------------ Ringway A/B scenarios
REDIS_PID=""
start_redis() {
  local d="$WORK/redis"; mkdir -p "$d"
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || die "redis-server/redis-cli not found (ratelimit)"
  "${PIN_BACKEND[@]}" redis-server --port "$PORT_REDIS" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$d" --logfile "$d/redis.log" --daemonize no > "$d/stdout" 2>&1 &
  REDIS_PID=$!
  LIVE[$REDIS_PID]=1
  local i
  for i in $(seq 100); do redis-cli -p "$PORT_REDIS" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.05; done
  die "redis-server did not start"
}
redis_calls() { # sum of calls over all commands except info (and the ping/commandstats of this script)
  redis-cli -p "$PORT_REDIS" INFO commandstats 2>/dev/null | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_/ { c = $1; sub("cmdstat_", "", c); if (c != "info" && c != "ping") s += $3 } END { print s + 0 }'
}
SSE_PID=""
start_sse_backend() {
  local d="$WORK/sse"; mkdir -p "$d"
  "${PIN_BACKEND[@]}" python3 "$BENCHES/backend/sse_backend.py" "$PORT_SSE" "$SSE_FRAMES" "$SSE_FRAME_BYTES" > "$d/stdout" 2>&1 &
  SSE_PID=$!
  LIVE[$SSE_PID]=1
  wait_http "http://127.0.0.1:$PORT_SSE/" 10 || { cat "$d/stdout" >&2; die "SSE backend did not start"; }
}
SSE_PACED_PID=""
start_sse_paced_backend() {
  local d="$WORK/sse-paced"; mkdir -p "$d"
  "${PIN_BACKEND[@]}" python3 "$BENCHES/backend/sse_backend.py" "$PORT_SSE_PACED" "$SSE_FRAMES" "$SSE_FRAME_BYTES" "$SSE_PACE_MS" > "$d/stdout" 2>&1 &
  SSE_PACED_PID=$!
  LIVE[$SSE_PACED_PID]=1
  wait_http "http://127.0.0.1:$PORT_SSE_PACED/" 10 || { cat "$d/stdout" >&2; die "paced SSE backend did not start"; }
}

# One request through Ringway for an A/B variant: status 200 and the expected body (bytes or frames).
check_ab() { # scen variant lua
  local url="http://127.0.0.1:$PORT_RINGWAY" got
  case "$1" in
    ratelimit)
      got=$(curl -s -o "$WORK/check.body" -w '%{http_code} %{size_download}' --max-time 20 \
        -H 'Authorization: Bearer sk-bench' "$url/hello" || echo "000 0")
      [ "$got" = "200 13" ] && return 0
      got="status/size '$got', expected '200 13'" ;;
    budget)
      local body; body=$(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$3")
      got=$(curl -s -o "$WORK/check.body" -w '%{http_code}' --max-time 20 -H 'Content-Type: application/json' \
        -H 'Authorization: Bearer sk-bench' --data-binary "$body" "$url/v1/chat/completions" || echo "000")
      if grep -q '"stream":true' <<<"$body"; then
        local frames; frames=$(grep -c '^data: ' "$WORK/check.body" || true)
        local want=$((SSE_FRAMES + 1)); [ "${2%%-*}" = off ] && want=$((SSE_FRAMES + 2))
        CHECK_FRAMES="$frames"
        [ "$got" = 200 ] && [ "$frames" = "$want" ] && return 0
        got="status $got, $frames data: frames (expected 200, $want)"
      else
        [ "$got" = 200 ] && grep -q '"usage"' "$WORK/check.body" && return 0
        got="status $got, no usage in the JSON body"
      fi ;;
    sse|ssepaced)
      local body; body=$(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$3")
      got=$(curl -s -o "$WORK/check.body" -w '%{http_code}' --max-time 20 -H 'Content-Type: application/json' \
        -H 'Authorization: Bearer sk-bench' --data-binary "$body" "$url/v1/chat/completions" || echo "000")
      local frames; frames=$(grep -c '^data: ' "$WORK/check.body" || true)
      local want=$((SSE_FRAMES + 2)); [ "$2" != off ] && [ "$2" != on-usage ] && want=$((SSE_FRAMES + 1))   # usage-only frame removed
      CHECK_FRAMES="$frames"
      [ "$got" = 200 ] && [ "$frames" = "$want" ] && tail -c 14 "$WORK/check.body" | grep -q '^data: \[DONE\]$' && return 0
      got="status $got, $frames data: frames (expected 200, $want, ending with [DONE])" ;;
  esac
  log "WARNING: ringway $2 ($1): one curl got $got"
  echo "- ringway $2 ($1): one curl got $got" >> "$WORK/anomalies"
  return 1
}

run_ab_scenario() { # scen conns path desc variant:template:lua ...
  local scen="$1" conns="$2" path="$3" desc="$4"; shift 4
  want "$scen" || return 0
  CUR_SCEN="$scen"
  local variants=("$@") r v
  log "scenario $scen: $desc ($ROUNDS round(s) x ${DURATION}s, variants: ${variants[*]%%:*})"
  local fpr=1 hdr=()
  PROBE_ARGS=(-H 'Authorization: Bearer sk-bench')
  START_PROBE_URL="http://127.0.0.1:$PORT_RINGWAY/hello"
  if [ "$scen" = ratelimit ]; then
    [ -n "$REDIS_PID" ] || start_redis
    UPSTREAM_PORT="$PORT_BACKEND"; hdr=(-H 'Authorization: Bearer sk-bench')
  elif [ "$scen" = ssepaced ]; then
    [ -n "$SSE_PACED_PID" ] || start_sse_paced_backend
    UPSTREAM_PORT="$PORT_SSE_PACED"; fpr=$((SSE_FRAMES + 2))
  else
    [ -n "$SSE_PID" ] || start_sse_backend
    UPSTREAM_PORT="$PORT_SSE"; fpr=$((SSE_FRAMES + 2))
  fi
  for r in $(seq "$ROUNDS"); do
    for v in "${variants[@]}"; do
      local name="${v%%:*}" rest="${v#*:}"; local tmpl="$BENCHES/proxies/${rest%%:*}" lua="${rest#*:}"
      [ -n "$lua" ] && lua="$BENCHES/wrk/$lua"
      CUR_PROXY="ringway-$name"
      start_proxy ringway "$tmpl"
      local url="http://127.0.0.1:$PORT_RINGWAY$path" check=ok
      CHECK_FRAMES=""
      check_ab "$scen" "$name" "$lua" || check=curl-check-failed
      local args=(-t1 "-c$conns" --timeout 5s ${hdr[@]+"${hdr[@]}"})
      [ -n "$lua" ] && args+=(-s "$lua")
      "${PIN_WRK[@]}" wrk "${args[@]}" "-d${WARMUP}s" "$url" > "$WORK/warm.out" 2>&1 || true
      local t0 t1 c0=0 c1=0 rt0=0 rt1=0 out="$WORK/wrk-$scen-$name-$r.out"
      if [ -n "$REDIS_PID" ] && [ "$scen" = ratelimit ]; then c0=$(redis_calls); rt0=$(cpu_ticks "$REDIS_PID"); fi
      t0=$(cpu_ticks "$PROXY_PID")
      "${PIN_WRK[@]}" wrk "${args[@]}" "-d${DURATION}s" --latency "$url" > "$out" 2>&1 || log "wrk exited non-zero (ringway $name, $scen)"
      t1=$(cpu_ticks "$PROXY_PID")
      if [ -n "$REDIS_PID" ] && [ "$scen" = ratelimit ]; then sleep 0.05; rt1=$(cpu_ticks "$REDIS_PID"); c1=$(redis_calls); fi
      local hwm; hwm=$(mem_kb VmHWM "$PROXY_PID")
      kill -0 "$PROXY_PID" 2>/dev/null || { echo "- ringway $name died during $scen round $r" >> "$WORK/anomalies"; check="proxy-died"; }
      stop_proxy
      local req rps p50 p99 bytes non2 sock sockd
      IFS=$'\t' read -r req rps p50 p99 bytes non2 sock sockd < <(python3 "$LIB" parse-wrk "$out")
      local cpu_us redis_per redis_cpu
      cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { if (n > 0) printf "%.3f", d / hz * 1e6 / n; else print "nan" }')
      redis_per=$(awk -v d=$((c1 - c0)) -v n="$req" 'BEGIN { if (n > 0) printf "%.7f", d / n; else print "nan" }')
      redis_cpu=$(awk -v d=$((rt1 - rt0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { if (n > 0) printf "%.3f", d / hz * 1e6 / n; else print "nan" }')
      [ "$req" -gt 0 ] || check="no-requests"
      if [ "${scen#sse}" != "$scen" ] && [ "$check" = ok ]; then
        # every response must carry the whole stream: bytes read per response >= 95 % of the checked body
        local cb; cb=$(stat -c %s "$WORK/check.body")
        awk -v b="$bytes" -v n="$req" -v s="$cb" 'BEGIN { exit !(n > 0 && b / n >= s * 0.95) }' || check="short-bodies"
      fi
      if [ "$non2" != 0 ] || [ "$sock" != 0 ] || [ "$check" != ok ]; then
        echo "- ringway $name $scen round $r: non-2xx $non2, socket errors $sock ($sockd), check $check" >> "$WORK/anomalies"
        cp "$out" "$OUTDIR/$STAMP-wrk-$scen-$name-$r.out" 2>/dev/null || true
      fi
      printf 'ab\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$scen" "$name" "$r" "$req" "$rps" "$p50" "$p99" "$cpu_us" "$hwm" "$bytes" "$non2" "$sock" "$sockd" "$check" \
        "$redis_per" "$redis_cpu" "$fpr" "${CHECK_FRAMES:--}" "$desc" >> "$RESULTS"
      log "  $scen r$r $name: $rps req/s p50 ${p50}ms p99 ${p99}ms cpu ${cpu_us}us/req redis ${redis_per} cmd/req ${redis_cpu}us/req hwm ${hwm}kB non2xx $non2 sockerr $sock $check"
    done
  done
  PROBE_ARGS=(); START_PROBE_URL=""; UPSTREAM_PORT="$PORT_BACKEND"
}

# ------------------------------------------------------------------ TLS termination scenarios
CLIENT_CNF=""
tls_setup() { # certificate + key for the proxies, OpenSSL config pinning the clients
  mkdir -p "$TLS_DIR"; chmod 755 "$TLS_DIR"
  # Self-signed ECDSA P-256 leaf for localhost / 127.0.0.1, 30 days (Ringway warns below 14).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 30 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$TLS_DIR/cert.key" -out "$TLS_DIR/cert.pem" > "$TLS_DIR/req.log" 2>&1 \
    || { cat "$TLS_DIR/req.log" >&2; die "openssl req failed"; }
  cat "$TLS_DIR/cert.pem" "$TLS_DIR/cert.key" > "$TLS_DIR/combined.pem"   # HAProxy: crt + key in one file
  chmod 600 "$TLS_DIR/combined.pem"
  CLIENT_CNF="$TLS_DIR/client-openssl.cnf"
  cat > "$CLIENT_CNF" <<'EOF'
# Loaded by the load clients only (OPENSSL_CONF): the same suite and group on every proxy.
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
Groups = X25519
EOF
}

s_client_summary() { # port [OPENSSL_CONF]: "TLSv1.3 SUITE, X25519, ECDSA/SHA256, ALPN http/1.1"
  local cnf="${2:-}" out
  if [ -n "$cnf" ]; then
    out=$(OPENSSL_CONF="$cnf" timeout 10 openssl s_client -connect "127.0.0.1:$1" -servername localhost -alpn http/1.1 </dev/null 2>&1 || true)
  else
    out=$(timeout 10 openssl s_client -connect "127.0.0.1:$1" -servername localhost -alpn http/1.1 </dev/null 2>&1 || true)
  fi
  printf '%s\n' "$out" | awk '
    /^(New|Reused), / { sub(/^(New|Reused), /, ""); sub(/, Cipher is /, " "); proto = $0 }
    /^Server Temp Key:/ { sub(/^Server Temp Key: /, ""); kx = $0 }
    /^Peer signature type:/ { sig = $4 }
    /^Peer signing digest:/ { dig = $4 }
    /^ALPN protocol:/ { alpn = $3 }
    /^No ALPN/ { alpn = "none" }
    END { if (proto == "") print "handshake FAILED"; else printf "%s, key exchange %s, signature %s/%s, ALPN %s\n", proto, kx, sig, dig, alpn }'
}

tls_probe() { # proxy (running): what a pinned and a default OpenSSL client negotiate; resumption
  local p="$1" port="${PORT[$1]}" pinned dflt resume
  pinned=$(s_client_summary "$port" "$CLIENT_CNF")
  dflt=$(s_client_summary "$port")
  resume=$(OPENSSL_CONF="$CLIENT_CNF" timeout 20 python3 "$LIB" tls-resume 127.0.0.1 "$port" /hello 2>&1 | tail -1 || true)
  echo "- $p: pinned client (wrk, s_time, Python here): $pinned; default OpenSSL 3 client: $dflt; 3 connections offering the previous session (version/suite/new-or-reused/status): $resume" >> "$WORK/tls-negotiated"
  log "  $p negotiated: pinned: $pinned | default client: $dflt | resumption: $resume"
  case "$pinned" in *"TLSv1.3 TLS_AES_128_GCM_SHA256, key exchange X25519"*) ;;
    *) echo "- $p: the pinned client did NOT negotiate TLS 1.3 / TLS_AES_128_GCM_SHA256 / X25519: $pinned" >> "$WORK/anomalies" ;;
  esac
}

run_stime_scenario() { # scen desc: full handshakes, STIME_CLIENTS parallel `openssl s_time -new`
  local scen="$1" desc="$2" r p i
  want tls-handshake || return 0
  CUR_SCEN="$scen"
  log "scenario $scen: $desc ($ROUNDS round(s) x ${DURATION}s)"
  for r in $(seq "$ROUNDS"); do
    for p in "${PROXY_LIST[@]}"; do
      CUR_PROXY="$p"
      start_proxy "$p"
      local port="${PORT[$p]}" check=ok
      check_once "$p" /hello 13 || check="curl-check-failed"
      local st=(openssl s_time -connect "127.0.0.1:$port" -new -www /hello)
      "${PIN_WRK[@]}" "${CLIENT_ENV[@]}" "${st[@]}" -time "$WARMUP" > "$WORK/stime-warm.out" 2>&1 || true
      local t0 t1 w0 w1 pids=() fails=0 conns=0 bytes=0 out="$WORK/stime-$scen-$p-$r.out"
      : > "$out"
      t0=$(cpu_ticks "$PROXY_PID"); w0=$(date +%s.%N)
      for i in $(seq "$STIME_CLIENTS"); do
        "${PIN_WRK[@]}" "${CLIENT_ENV[@]}" "${st[@]}" -time "$DURATION" > "$WORK/stime.$i" 2>&1 &
        pids+=($!); LIVE[$!]=1
      done
      for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || fails=$((fails + 1))
        unset "LIVE[${pids[$i]}]"
      done
      w1=$(date +%s.%N); t1=$(cpu_ticks "$PROXY_PID")
      for i in $(seq "$STIME_CLIENTS"); do
        # "N connections in 1.11s; ... bytes read B" (first line of the -new part)
        local c b
        c=0 b=0
        read -r c b < <(tr -d '*' < "$WORK/stime.$i" | awk '/connections in .*s; .*bytes read/ { print $1, $NF; exit }') || true
        conns=$((conns + ${c:-0})); bytes=$((bytes + ${b:-0}))
        grep -aq -i 'error' "$WORK/stime.$i" && fails=$((fails + 1))
        { echo "== client $i"; tr -d '*' < "$WORK/stime.$i"; } >> "$out"
      done
      local hwm; hwm=$(mem_kb VmHWM "$PROXY_PID")
      kill -0 "$PROXY_PID" 2>/dev/null || { echo "- $p died during $scen round $r" >> "$WORK/anomalies"; check="proxy-died"; }
      stop_proxy
      local rps cpu_us
      rps=$(awk -v n="$conns" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.2f", n / (b - a) }')
      cpu_us=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$conns" 'BEGIN { if (n > 0) printf "%.3f", d / hz * 1e6 / n; else print "nan" }')
      # every connection read a response: > 100 bytes (status line, headers, 13-byte body) on average
      awk -v b="$bytes" -v n="$conns" 'BEGIN { exit !(n > 0 && b / n > 100) }' || check="short-responses"
      [ "$conns" -gt 0 ] || check="no-requests"
      if [ "$fails" != 0 ] || [ "$check" != ok ]; then
        echo "- $p $scen round $r: $fails s_time client(s) failed or printed an error, check $check" >> "$WORK/anomalies"
        cp "$out" "$OUTDIR/$STAMP-stime-$scen-$p-$r.out" 2>/dev/null || true
      fi
      printf 'wrk\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$scen" "$p" "$r" "$conns" "$rps" nan nan "$cpu_us" "$hwm" "$bytes" 0 "$fails" "$([ "$fails" = 0 ] && echo 0 || echo "s_time-failed/$fails")" "$check" "$desc" >> "$RESULTS"
      log "  $scen r$r $p: $rps conn/s ($conns full handshakes, $((conns > 0 ? bytes / conns : 0)) B/conn) cpu ${cpu_us}us/conn hwm ${hwm}kB failed-clients $fails $check"
    done
  done
}

run_tls() {
  want_tls || return 0
  tls_setup
  SCHEME=https; PROBE_ARGS=(-k); CLIENT_ENV=(env "OPENSSL_CONF=$CLIENT_CNF")
  RINGWAY_TMPL="$BENCHES/proxies/ringway-tls.toml" NGINX_TMPL="$BENCHES/proxies/nginx-proxy-tls.conf" HAPROXY_TMPL="$BENCHES/proxies/haproxy-tls.cfg"
  CUR_SCEN=tls-probe
  log "TLS: what each proxy negotiates (openssl s_client) and whether it resumes (benchlib.py tls-resume)"
  : > "$WORK/tls-negotiated"
  local p
  for p in "${PROXY_LIST[@]}"; do CUR_PROXY="$p"; start_proxy "$p"; tls_probe "$p"; stop_proxy; done
  run_wrk_scenario tls-small /hello 64 13 "TLS 1.3 (AES-128-GCM, X25519, ECDSA P-256): GET /hello (13-byte body), 64 keep-alive connections"
  WRK_EXTRA=(-H 'Connection: close')
  run_wrk_scenario tls-handshake /hello 64 13 "TLS 1.3: GET /hello with Connection: close, 64 connections, wrk: one RESUMED handshake (PSK + X25519) per request"
  WRK_EXTRA=()
  run_stime_scenario tls-handshake-new "TLS 1.3: FULL handshake (X25519 + ECDSA P-256 signature) + one GET /hello (HTTP/1.0) per connection, $STIME_CLIENTS parallel openssl s_time -new; req/s = connections/s, CPU µs/req = per connection"
  run_wrk_scenario tls-1m /1m 64 1048576 "TLS 1.3: GET /1m (1 MiB body), 64 keep-alive connections"
  run_idle tls-idle "$TLS_IDLE_N" tls
  SCHEME=http; PROBE_ARGS=(); CLIENT_ENV=()
  RINGWAY_TMPL="$BENCHES/proxies/ringway.toml" NGINX_TMPL="$BENCHES/proxies/nginx-proxy.conf" HAPROXY_TMPL="$BENCHES/proxies/haproxy.cfg"
}

mkdir -p "$OUTDIR"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
START_TS="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
log "work dir $WORK; ports backend $PORT_BACKEND ringway $PORT_RINGWAY nginx $PORT_NGINX haproxy $PORT_HAPROXY"
log "$PIN_NOTE"
start_backend

run_wrk_scenario small64   /hello  64   13      "GET /hello (13-byte body), 64 connections"
run_wrk_scenario small1000 /hello  1000 13      "GET /hello (13-byte body), 1000 connections"
run_wrk_scenario resp16k   /16k    64   16384   "GET /16k (16 KiB body), 64 connections"
run_wrk_scenario resp1m    /1m     64   1048576 "GET /1m (1 MiB body), 64 connections"
run_wrk_scenario post64k   /upload 64   3       "POST /upload with a 64 KiB body, 64 connections" "$BENCHES/wrk/post64k.lua"
run_download
run_idle
run_ab_scenario ratelimit 64 /hello "GET /hello with a consumer key, 64 connections: cluster-scope rate limit (Redis) on vs off" \
  off:ringway-ratelimit-off.toml: on:ringway-ratelimit-on.toml:
run_ab_scenario sse 64 /v1/chat/completions "streamed chat completion ($SSE_FRAMES frames of ~$SSE_FRAME_BYTES B + usage + [DONE], chunked), 64 connections: AI route (key-auth, token-limit, ai-stats) on vs plain route off" \
  off:ringway-sse-off.toml:sse.lua on:ringway-sse-on.toml:sse.lua on-usage:ringway-sse-on.toml:sse-usage.lua
run_ab_scenario ssepaced 64 /v1/chat/completions "streamed chat completion as a model sends it: $SSE_FRAMES frames of ~$SSE_FRAME_BYTES B + usage + [DONE], one frame per origin write, $SSE_PACE_MS ms apart, 64 connections: AI route on vs plain route off; budget-on adds the cost-limit (issue 14's whole chain)" \
  off:ringway-sse-off.toml:sse.lua on:ringway-sse-on.toml:sse.lua on-usage:ringway-sse-on.toml:sse-usage.lua \
  budget-on:ringway-budget-on.toml:sse.lua
# Issue 14: the whole AI filter chain (key-auth, token-limit, cost-limit, ai-stats) against the
# plain route, streamed and not.
run_ab_scenario budget 64 /v1/chat/completions "chat completion, streamed ($SSE_FRAMES frames) and not (JSON, ~1 KiB), 64 connections: AI route with key-auth + token-limit + cost-limit + ai-stats (on) vs the plain route (off)" \
  off-stream:ringway-sse-off.toml:sse.lua on-stream:ringway-budget-on.toml:sse.lua \
  off-json:ringway-sse-off.toml:chat.lua on-json:ringway-budget-on.toml:chat.lua
run_tls

LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
META="$WORK/meta.md"
{
  echo "## Ringway benchmark — $START_TS"
  echo
  echo "- command: \`$CMDLINE\` ($([ "$QUICK" = 1 ] && echo "QUICK run: " )$ROUNDS round(s), ${DURATION}s per wrk run after a ${WARMUP}s warm-up, medians over rounds)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM"
  echo "- load average (1/5/15 min) before: $LOAD_BEFORE, after: $LOAD_AFTER (other work shares this machine unless these are near 0)"
  echo "- pinning: $PIN_NOTE"
  echo "- workers: proxy $WORKERS (Ringway workers, nginx worker_processes, HAProxy nbthread); backend nginx $BACKEND_WORKERS worker(s); wrk -t1"
  echo "- ringway: $RINGWAY_SRC ($RINGWAY_VERSION, sha256 $RINGWAY_SUM); $("$NGINX" -v 2>&1); $("$HAPROXY" -v 2>&1 | awk 'NR == 1 {print $1, $2, $3}'); $(wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}' || true)"
  echo "- CPU µs/req = proxy (all processes and threads) utime+stime delta over the measured wrk run / CLK_TCK($CLK_TCK) / requests completed; peak RSS = VmHWM summed over the proxy's processes (nginx: master + workers)"
  echo "- ulimit -n $NOFILE"
  if want ratelimit; then echo "- ratelimit: own $(redis-server --version 2>&1 | awk '{print $1, $2, $3}'), port $PORT_REDIS, --save '' --appendonly no"; fi
  if want ssepaced; then echo "- ssepaced: the same origin with pacing (one frame per write, $SSE_PACE_MS ms apart)"; fi
  if want sse; then echo "- sse: origin benches/backend/sse_backend.py (python3 asyncio, one write per response), $SSE_FRAMES frames of ~$SSE_FRAME_BYTES B + usage + [DONE]"; fi
  if want_tls; then
    echo "- TLS (client <-> proxy; proxy <-> origin plain): TLS 1.3, TLS_AES_128_GCM_SHA256, X25519, self-signed ECDSA P-256 certificate made by \`openssl req\` at run time in the temp dir (deleted afterwards); $(openssl version). nginx: \`ssl_protocols TLSv1.3; ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256; ssl_ecdh_curve X25519;\` (tickets default on, no session cache); HAProxy: \`bind ... ssl crt ... alpn http/1.1 ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256 curves X25519\` (defaults: tickets + session cache); Ringway: rustls/aws-lc-rs, \`min_version = \"1.3\"\`, no suite/group setting (follows the client's order), stateless tickets. Clients (wrk, s_time, Python) pinned with OPENSSL_CONF: MinProtocol TLSv1.3, Ciphersuites TLS_AES_128_GCM_SHA256, Groups X25519"
    echo "- TLS negotiated (openssl s_client before the runs):"
    sed 's/^/  /' "$WORK/tls-negotiated" 2>/dev/null || true
    if want tls-handshake; then echo "- tls-handshake: wrk 4.1 keeps its SSL session across reconnects (SSL_shutdown + SSL_clear), so with Connection: close every request after the first per connection is a RESUMED TLS 1.3 handshake (PSK + X25519 key share, no certificate signature) — see the resumption probe above; tls-handshake-new: $STIME_CLIENTS parallel \`openssl s_time -new -www /hello -time $DURATION\` (new SSL object per connection: FULL handshakes, HTTP/1.0 GET, the proxy closes), connections/s from the total over the wall time, CPU µs per connection"; fi
    if want tls-idle; then echo "- tls-idle: $TLS_IDLE_N connections, each a TLS 1.3 handshake (Python ssl, OPENSSL_CONF-pinned) + one GET /hello, then held open; bytes = (VmRSS after - before) / N"; fi
  fi
  if [ -s "$WORK/anomalies" ]; then
    echo
    echo "**Anomalies (runs flagged):**"
    echo
    cat "$WORK/anomalies"
  else
    echo "- anomalies: none (every run: only 2xx, no socket errors, byte counts as expected)"
  fi
} > "$META"

cp "$RESULTS" "$OUTDIR/$STAMP.tsv"
python3 "$LIB" report "$RESULTS" "$META" | tee "$OUTDIR/$STAMP.md"
log "written $OUTDIR/$STAMP.md"

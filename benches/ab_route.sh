# Sourced by benches/instructions.sh and benches/cpu_split.sh: the A/B pair of routes they
# compare, and the origin both run against. Expects ROOT, WORK, VARIANT and a `pids` array.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# The route's config template: off, the plain route; on, the whole AI chain.
case "$VARIANT" in
  off) tmpl="$ROOT/benches/proxies/ringway-sse-off.toml" ;;
  on) tmpl="$ROOT/benches/proxies/ringway-budget-on.toml" ;;
  *) echo "$(basename "$0"): VARIANT is off or on" >&2; exit 2 ;;
esac

# The origin (200 frames of 150 B, or one JSON completion) on a free port; `port` for the gateway.
up=$(free_port) port=$(free_port)
python3 "$ROOT/benches/backend/sse_backend.py" "$up" 200 150 > "$WORK/origin.log" 2>&1 &
pids+=($!)
wait_port "$up"

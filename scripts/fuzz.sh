#!/usr/bin/env bash
# Runs every fuzz target for a while (default 300 s each; FUZZ_SECONDS=30 for a smoke run).
#   bash scripts/fuzz.sh                 # every target in fuzz/, 5 minutes each
#   FUZZ_SECONDS=30 bash scripts/fuzz.sh head chunked
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz wants a nightly compiler;
# with the stable toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags it needs.
#
# Stops at the first crash (panic, failed assertion, sanitizer report, timeout, OOM) with a
# message naming the saved input under fuzz/artifacts/<target>/ and the command that replays
# it; exits 1. Turn each crash into a regression test next to the code it exercises.
# Each target's libFuzzer output goes to $FUZZ_LOG_DIR/<target>.log (default
# target/fuzz-logs); the last lines printed are one summary per target (runs, corpus size).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_EACH="${FUZZ_SECONDS:-300}"
LOG_DIR="${FUZZ_LOG_DIR:-$ROOT/target/fuzz-logs}"
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz.sh: cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
TARGETS=("$@")
# No arguments: every target in fuzz/Cargo.toml (chunked config head scanners sse).
[ "${#TARGETS[@]}" -gt 0 ] || mapfile -t TARGETS < <(cargo fuzz list --fuzz-dir fuzz)
[ "${#TARGETS[@]}" -gt 0 ] || { echo "fuzz.sh: no fuzz targets found" >&2; exit 1; }
mkdir -p "$LOG_DIR"

# Build every requested target first, so a compile error is not mistaken for a crash
# and the fuzzing time is spent fuzzing.
for t in "${TARGETS[@]}"; do
  cargo fuzz build --fuzz-dir fuzz "$t"
done

SUMMARY=()
for t in "${TARGETS[@]}"; do
  echo "== fuzz $t for ${SECONDS_EACH}s (log: $LOG_DIR/$t.log) =="
  mkdir -p "fuzz/artifacts/$t" "fuzz/corpus/$t"
  stamp="$(mktemp)"
  rc=0
  # -print_final_stats: stat::number_of_executed_units etc. at the end of the log.
  cargo fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$SECONDS_EACH" -max_len=65536 \
    -print_final_stats=1 >"$LOG_DIR/$t.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then tail -n 80 "$LOG_DIR/$t.log"; else tail -n 7 "$LOG_DIR/$t.log"; fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG_DIR/$t.log" | tail -n 1)"
  # libFuzzer's last status line: "#N DONE cov: C ft: F corp: UNITS/SIZE ..."
  corp="$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[A-Za-z]*\).*/\1/p' "$LOG_DIR/$t.log" | tail -n 1)"
  files="$(find "fuzz/corpus/$t" -type f | wc -l)"
  if [ "$rc" -ne 0 ]; then
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$LOG_DIR/$t.log" | tail -n 1)"
    [ -n "$artifact" ] || artifact="$(find "fuzz/artifacts/$t" -type f -newer "$stamp" | head -n 1)"
    rm -f "$stamp"
    echo
    echo "fuzz.sh: CRASH: target '$t' failed (exit $rc) after ${runs:-?} runs"
    if [ -n "$artifact" ]; then
      echo "fuzz.sh: crashing input: $artifact"
      echo "fuzz.sh: replay:   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t $artifact"
      echo "fuzz.sh: minimize: RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir fuzz $t $artifact"
    else
      echo "fuzz.sh: no input saved under fuzz/artifacts/$t/ (see $LOG_DIR/$t.log)"
    fi
    exit 1
  fi
  rm -f "$stamp"
  SUMMARY+=("fuzz $t: ok, ${SECONDS_EACH}s, runs ${runs:-?}, corpus ${corp:-?} (units/bytes in use), $files files in fuzz/corpus/$t")
done
echo
printf '%s\n' "${SUMMARY[@]}"

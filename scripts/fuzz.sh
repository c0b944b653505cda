#!/usr/bin/env bash
# Runs every fuzz target for a while (default 300 s each; FUZZ_SECONDS=30 for a smoke run).
#   bash scripts/fuzz.sh                 # all targets, 5 minutes each
#   FUZZ_SECONDS=30 bash scripts/fuzz.sh head chunked
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz wants a nightly compiler; with the
# stable toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags it needs.
# Crashes are saved under fuzz/artifacts/<target>/; turn each into a regression test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_EACH="${FUZZ_SECONDS:-300}"
TARGETS=("$@")
[ "${#TARGETS[@]}" -gt 0 ] || TARGETS=(head chunked sse scanners config)
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz.sh: cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
for t in "${TARGETS[@]}"; do
  echo "== fuzz $t for ${SECONDS_EACH}s =="
  cargo fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$SECONDS_EACH" -max_len=65536
done

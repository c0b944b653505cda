#!/usr/bin/env bash
# Runs Ringway on a fresh Debian machine: installs what is missing, builds the
# release binary, then runs it with the arguments given.
#   bash scripts/run.sh demo                 # gateway + built-in OpenAI-compatible upstream
#   bash scripts/run.sh                      # the embedded default config (conf/ringway.toml)
#   bash scripts/run.sh --conf FILE          # your config
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >&2
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --release >&2
exec "$ROOT/target/release/ringway" "$@"

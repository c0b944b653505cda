#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: installs only what is missing.
# - apt packages (one `apt-get update`, only if something must be installed)
# - a Rust toolchain via rustup, only if cargo is missing
# - a Python venv at .venv with the e2e test dependencies
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf 'setup: %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "not root and no sudo: apt installs will be skipped"; SUDO="__none__"; fi
fi

# command -> debian package
declare -A NEED_CMD=(
  [curl]=curl
  [pkg-config]=pkg-config
  [redis-server]=redis-server
  [nginx]=nginx
  [haproxy]=haproxy
  [wrk]=wrk
  [cc]=build-essential
)
missing=()
for cmd in "${!NEED_CMD[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("${NEED_CMD[$cmd]}")
  fi
done
# python3 with a working venv module (ensurepip is what python3-venv provides on Debian)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$SUDO" = "__none__" ]; then
    log "MISSING packages (cannot install without root): ${missing[*]}"
  else
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    log "apt packages installed"
  fi
else
  log "apt packages: all present"
fi

# Rust toolchain, only when cargo is missing.
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo missing: installing rustup toolchain (stable, minimal profile)"
  if command -v rustup >/dev/null 2>&1; then
    rustup toolchain install stable --profile minimal
    rustup default stable
  else
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
  log "cargo installed: $(cargo --version)"
else
  log "cargo present: $(cargo --version)"
fi

# Python venv with the test dependencies (major versions pinned).
PY_REQS=(
  "pytest>=8,<10"
  "requests>=2,<3"
  "prometheus-client>=0.20,<1"
  "openai>=1,<4"
  "anthropic>=0.30,<3"
)
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "creating venv at .venv"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
if "$VENV/bin/python" - "${PY_REQS[@]}" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
for spec in sys.argv[1:]:
    r = Requirement(spec)
    try:
        v = version(r.name)
    except PackageNotFoundError:
        sys.exit(1)
    if not r.specifier.contains(v, prereleases=True):
        sys.exit(1)
PY
then
  log "venv: python packages present"
else
  log "installing python packages into .venv: ${PY_REQS[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_REQS[@]}" packaging
  log "python packages installed"
fi
log "done"

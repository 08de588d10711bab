#!/usr/bin/env bash
# The whole test suite, on a fresh Debian or Ubuntu machine: installs what is missing
# (redis-server, nginx, Node.js and npm from apt; npm packages from package-lock.json),
# builds once, then runs the Rust tests (unit + integration, with real redis-server and
# nginx) and the interop tests with the official @microsoft/signalr client.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian keeps nginx in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || missing+=(nginx)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  # Installing packages must not start their services (port 80, port 6379): the tests
  # start their own on free loopback ports.
  printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
  as_root chmod +x /usr/sbin/policy-rc.d
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  as_root rm -f /usr/sbin/policy-rc.d
fi
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

say "npm packages (from package-lock.json)"
npm ci --no-audit --no-fund --loglevel=error

say "build"
cargo build --bins --locked

say "Rust tests (unit and integration)"
cargo test --locked -- --test-threads="${TEST_THREADS:-2}"

say "interop tests with the official @microsoft/signalr client"
STICKLESS_BIN="$PWD/target/debug/stickless" \
STICKLESS_CLUSTER_BIN="$PWD/target/debug/stickless-cluster" \
  npm test

# --- Interop tests with third-party Python clients (tests/python) -----------------------
# signalrcore and pysignalr from PyPI, pinned with pytest in tests/python/requirements.txt,
# installed into a virtual environment under target/. pytest exits 5 when it collected no
# tests: that fails the run too.
say "interop tests with third-party Python clients (signalrcore, pysignalr)"
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
fi
venv=target/interop-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
pytest_status=0
STICKLESS_BIN="$PWD/target/debug/stickless" \
STICKLESS_CLUSTER_BIN="$PWD/target/debug/stickless-cluster" \
  "$venv/bin/pytest" tests/python -p no:cacheprovider -ra || pytest_status=$?
if [ "$pytest_status" -eq 5 ]; then
  echo "pytest collected no tests in tests/python" >&2
  exit 1
fi
[ "$pytest_status" -eq 0 ] || exit "$pytest_status"

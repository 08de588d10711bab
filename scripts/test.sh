#!/usr/bin/env bash
# The whole test suite, one command, on a fresh Debian or Ubuntu machine with Rust:
#   - installs what is missing (apt: redis-server, nginx, chromium, nodejs, npm,
#     python3-venv; npm packages from package-lock.json; never a downloaded browser;
#     signalrcore, pysignalr and pytest pinned in tests/python/requirements.txt, in a venv),
#   - builds once,
#   - runs the Rust tests (unit + integration, real redis-server and nginx) alongside the
#     single-instance Node suites (official @microsoft/signalr client, chat page in
#     Chromium) and the Docker Compose suite (scripts/compose-test.sh), then the Node
#     cluster suites beside the third-party Python clients,
#   - prints each suite's output whole when it ends, then every runner's own summary lines,
#   - exits non-zero if anything failed.
# Works without a terminal and with CI=true. Suite logs are kept in target/test-logs/.
set -uo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian keeps nginx in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------------------------------
# What the tests need
# ---------------------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v nginx >/dev/null || missing+=(nginx)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq || die "apt-get update failed"
  # Installing packages must not start their services (port 80, port 6379): the tests
  # start their own on free loopback ports.
  printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
  as_root chmod +x /usr/sbin/policy-rc.d
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { as_root rm -f /usr/sbin/policy-rc.d; die "apt-get install ${missing[*]} failed"; }
  as_root rm -f /usr/sbin/policy-rc.d
fi
command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"

say "npm packages (from package-lock.json)"
npm ci --no-audit --no-fund --no-progress --loglevel=error || die "npm ci failed"

say "Python packages (tests/python/requirements.txt, pinned) in target/interop-venv"
VENV="$PWD/target/interop-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt \
  || die "pip install failed"

say "build"
cargo build --bins --example testhub --locked || die "cargo build failed"
cargo test --locked --no-run || die "building the Rust tests failed"

# ---------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------
LOGS=target/test-logs
rm -rf "$LOGS"
mkdir -p "$LOGS"
export STICKLESS_BIN="$PWD/target/debug/stickless"
export STICKLESS_CLUSTER_BIN="$PWD/target/debug/stickless-cluster"
NODE_TEST=(node --test --test-reporter=tap --test-concurrency=1 --test-force-exit)

declare -A status=() pids=()

# Runs suite $1 (the rest is its command) in the background, its output to its log, so
# suites running side by side do not interleave their lines.
start_suite() {
  local name=$1
  shift
  "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  pids[$name]=$!
  echo "started $name"
}

# Waits for suite $1, then prints its whole output under a header.
finish_suite() {
  local name=$1
  wait "${pids[$name]}"
  status[$name]=$?
  say "$name: exit ${status[$name]} (log: $LOGS/$name.log)"
  cat "$LOGS/$name.log"
}

say "Rust tests, single-instance Node suites and the Docker Compose suite, in parallel"
# The compose suite (scripts/compose-test.sh) spends its first minutes fetching Debian
# packages and building images, so it runs beside the others. It needs root (dockerd);
# STICKLESS_SKIP_COMPOSE=1 leaves out everything but its validation step.
start_suite compose as_root env STICKLESS_SKIP_COMPOSE="${STICKLESS_SKIP_COMPOSE:-}" \
  STICKLESS_BIN="$STICKLESS_BIN" ./scripts/compose-test.sh
start_suite rust cargo test --locked -- --test-threads="${TEST_THREADS:-2}"
# Single-instance suites: one instance each. Every other tests/node/*.test.mjs starts
# clusters, and runs after them, so that a new test file cannot be left out.
SINGLE_NODE=(tests/node/single.test.mjs tests/node/official-client.test.mjs tests/node/browser.test.mjs
  tests/node/testhub.test.mjs tests/node/stateful.test.mjs)
CLUSTER_NODE=()
for file in tests/node/*.test.mjs; do
  case " ${SINGLE_NODE[*]} " in *" $file "*) ;; *) CLUSTER_NODE+=("$file") ;; esac
done
start_suite node-single "${NODE_TEST[@]}" "${SINGLE_NODE[@]}"
finish_suite node-single
finish_suite rust

say "Node cluster suites and the third-party Python clients, in parallel"
start_suite node-cluster "${NODE_TEST[@]}" "${CLUSTER_NODE[@]}"
# signalrcore and pysignalr (tests/python), one instance and a cluster each.
start_suite python "$VENV/bin/pytest" tests/python -p no:cacheprovider -ra
finish_suite python
finish_suite node-cluster

finish_suite compose

# ---------------------------------------------------------------------------------------
# Summary: each runner's own closing lines
# ---------------------------------------------------------------------------------------
say "summary"
failed=0
for name in rust node-single node-cluster python compose; do
  echo "-- $name (exit ${status[$name]})"
  case $name in
    rust) grep -E '^test result:' "$LOGS/$name.log" ;;
    compose) grep -E '^compose: [0-9]+ passed, [0-9]+ failed' "$LOGS/$name.log" ;;
    python) grep -E '^=+ .*(passed|failed|error|no tests ran).* =+$' "$LOGS/$name.log" ;;
    *) grep -E '^# (tests|pass|fail|cancelled|skipped|todo) [0-9]+$' "$LOGS/$name.log" ;;
  esac
  # pytest exits 5 when it collected no tests: a failure too.
  [ "${status[$name]}" = 0 ] || failed=1
done
# The run ends with the runners' own summary lines above; the verdict goes to stderr.
if [ "$failed" -ne 0 ]; then
  echo "FAILED: see the logs above (and $LOGS/)" >&2
  exit 1
fi

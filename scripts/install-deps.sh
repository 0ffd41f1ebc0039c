#!/usr/bin/env bash
# Installs what agentmesh needs on a Debian machine, in two sets:
#
#   --demo   what `./scripts/demo.sh` and the README's agents need: nats-server
#            (JetStream), clickhouse-server + client, python3 with venv, and
#            the Python SDK (nats-py, nkeys) in the virtual environment
#            `.agentmesh/venv`.
#   (none)   the test set (`./scripts/test.sh`): the demo set, plus
#            docker-compose (to validate compose.yaml), chromium +
#            chromium-driver (the `meshctl ui` browser test), and the SDK's
#            test dependencies in the same venv (pytest, a2a-sdk,
#            OpenTelemetry).
#
# With `--replicated` (or AGENTMESH_REPLICATED=1) also ZooKeeper (Debian's
# `zookeeper`, which pulls a JRE), for the replicated ClickHouse that the
# replicated tests and `meshctl up --clickhouse-replicas 2` start; without
# it, nothing of that is installed.
#
# Python packages go into `.agentmesh/venv` only, never into the system's
# Python (no `--break-system-packages`); the tests use that interpreter
# (tests/tests/python_support) unless AGENTMESH_PYTHON names another.
# Safe to run again: it installs only what is missing.
set -euo pipefail

replicated="${AGENTMESH_REPLICATED:-0}"
set_name=test
for arg in "$@"; do
  case "$arg" in
    --replicated) replicated=1 ;;
    --demo) set_name=demo ;;
    *) echo "usage: $0 [--demo] [--replicated]" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.agentmesh/venv"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have nats-server || missing+=(nats-server)
have clickhouse-server || missing+=(clickhouse-server)
have clickhouse-client || missing+=(clickhouse-client)
have python3 || missing+=(python3)
# venv with pip (Debian splits ensurepip out into python3-venv).
if [ ! -x "$venv/bin/python" ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv)
fi
if [ "$set_name" = test ]; then
  have docker-compose || missing+=(docker-compose)
  have chromium || missing+=(chromium)
  have chromedriver || missing+=(chromium-driver)
fi
if [ "$replicated" = 1 ]; then
  { [ -f /usr/share/java/zookeeper.jar ] && have java; } || missing+=(zookeeper)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Python SDK (sdk/python: nats-py, nkeys, pynacl) in its own virtual
# environment; the test set adds pytest, the official a2a-sdk (the A2A
# payloads are checked against its types) and OpenTelemetry's SDK with the
# OTLP/HTTP exporter.
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating the virtual environment .agentmesh/venv (python3 -m venv) for the Python SDK"
  mkdir -p "$root/.agentmesh"
  python3 -m venv "$venv"
fi
if [ "$set_name" = test ]; then
  extras="[test,otel]"
  probe='import agentmesh, nats, nkeys, nacl, pytest, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http'
else
  extras=""
  probe='import agentmesh, nats, nkeys, nacl'
fi
if ! "$venv/bin/python" -c "$probe" 2>/dev/null; then
  echo "==> installing the Python SDK${extras:+ with its extras $extras} into .agentmesh/venv (PyPI; editable: it follows sdk/python)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root/sdk/python$extras"
fi

case ":$PATH:" in *":/usr/sbin:"*) ;; *) echo "note: nats-server and clickhouse-server live in /usr/sbin; agentmesh looks there too" ;; esac
echo "==> dependencies ready ($set_name set): $(nats-server --version 2>/dev/null || /usr/sbin/nats-server --version)"
echo "==> Python SDK: .agentmesh/venv/bin/python (a virtual environment; the system's Python is left alone)"
if [ "$replicated" = 1 ]; then
  echo "==> ZooKeeper for replicated ClickHouse: /usr/share/java/zookeeper.jar, $(java -version 2>&1 | head -1)"
fi

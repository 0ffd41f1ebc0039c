#!/usr/bin/env bash
# The main job on a fresh machine: install the servers, build agentmesh,
# start the local stack in the background and run the demo workflow, which
# prints its decision tree from ClickHouse. `target/release/meshctl down`
# stops the stack again.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
export PATH="$PATH:/usr/sbin"

echo "==> cargo build --release"
cargo build --release --locked --bins
MESHCTL=target/release/meshctl

"$MESHCTL" up --detach
"$MESHCTL" status
"$MESHCTL" demo

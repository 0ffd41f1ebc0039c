#!/usr/bin/env bash
# The test command: installs the servers the tests start (nats-server,
# clickhouse-server), checks formatting, lints, validates compose.yaml when
# present, and runs every test of the workspace against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
export PATH="$PATH:/usr/sbin"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
if [ -f compose.yaml ]; then
  echo "==> docker-compose config"
  docker-compose -f compose.yaml config -q
fi
echo "==> cargo test"
cargo test --workspace --locked

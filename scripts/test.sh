#!/usr/bin/env bash
# The test command: installs the servers the tests start (nats-server,
# clickhouse-server), checks formatting, unused dependencies, licenses and
# banned crates, lints, the API docs (no rustdoc
# warnings), validates compose.yaml and compose.cluster.yaml when present,
# and runs every test of the workspace against real servers (ZooKeeper and
# two ClickHouse replicas for the replicated tests, three nats-server nodes
# for the cluster tests) — among them the Python SDK's pytest suite
# (sdk/python/tests), which tests/tests/it/python_sdk.rs runs against the mesh
# it starts, and the cross-agent trace check (traces_across_agents.rs).
# Then scripts/compose-check.sh runs both compose files for real (podman);
# its `compose: …` count comes just above the closing `tests: …` line.
set -euo pipefail
cd "$(dirname "$0")/.."

# --replicated: ZooKeeper too, for the replicated ClickHouse tests
# (testkit's ZooKeeperServer, tests/tests/it/replicated_clickhouse.rs).
./scripts/install-deps.sh --replicated
export PATH="$PATH:/usr/sbin"
# A cold build gains nothing from incremental caches; they only cost disk
# (GiBs for some thirty test binaries).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
target_dir="${CARGO_TARGET_DIR:-target}"
echo "==> disk: $(df -Ph . | awk 'NR == 2 { print $4 }') free"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
# Unused dependencies fail the run (each one costs every build its compile
# time). cargo-machete (and cargo-deny below) are installed once into a
# cache of their own (about 2 and 4.5 minutes on 2 busy cores; a version
# check afterwards); a false positive (a crate
# imported under another name, or linked only for a feature) is listed
# under `[package.metadata.cargo-machete] ignored` with the reason.
machete_version=0.9.2
tools="${AGENTMESH_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/agentmesh/tools}"
if [ "$("$tools/bin/cargo-machete" --version 2>/dev/null)" != "$machete_version" ]; then
  echo "==> installing cargo-machete $machete_version into $tools"
  cargo install --locked --quiet cargo-machete --version "$machete_version" --root "$tools"
fi
echo "==> cargo machete (unused dependencies)"
"$tools/bin/cargo-machete"
# Licenses and banned crates (deny.toml), offline: cargo metadata only. The
# advisory check needs the RustSec database from the network; not here.
deny_version=0.20.2
if [ "$("$tools/bin/cargo-deny" --version 2>/dev/null)" != "cargo-deny $deny_version" ]; then
  echo "==> installing cargo-deny $deny_version into $tools"
  cargo install --locked --quiet cargo-deny --version "$deny_version" --root "$tools"
fi
echo "==> cargo deny (licenses, bans)"
"$tools/bin/cargo-deny" --offline --log-level error check licenses bans
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
for compose in compose.yaml compose.cluster.yaml; do
  if [ -f "$compose" ]; then
    echo "==> docker-compose -f $compose config"
    docker-compose -f "$compose" config -q
  fi
done
echo "==> cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
# `meshctl up` (and the quickstart test) runs every service binary found
# beside meshctl; `cargo test` builds a binary only for crates that have
# integration tests, so the rest (mcp-gateway, mcp-bridge) are built here.
echo "==> cargo build --bins"
cargo build --workspace --bins --locked --quiet
echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The NVML test needs a GPU (`#[ignore]`d, counted as skipped): run it too
# where one answers. `scripts/gpu-check.sh` runs it alone.
if [ "$status" -eq 0 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "==> a GPU answers: the NVML test too"
  cargo test -p gpu-scaler --test it nvml:: --locked -- --ignored 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
# compose.yaml and compose.cluster.yaml for real (podman + docker-compose
# with local stand-in images; see the script). Its own count, printed
# again above the closing line; AGENTMESH_COMPOSE_CHECK=0 leaves it out.
compose_log=$(mktemp)
trap 'rm -f "$log" "$compose_log"' EXIT
if [ "${AGENTMESH_COMPOSE_CHECK:-1}" = 0 ]; then
  echo "compose: skipped (AGENTMESH_COMPOSE_CHECK=0)" >"$compose_log"
else
  echo "==> scripts/compose-check.sh"
  ./scripts/compose-check.sh 2>&1 | tee "$compose_log"
  compose_status=${PIPESTATUS[0]}
  [ "$compose_status" -eq 0 ] || status=$compose_status
fi
set -e
echo "==> target dir: $(du -sh "$target_dir" 2>/dev/null | cut -f1), disk: $(df -Ph . | awk 'NR == 2 { print $4 }') free"
# One closing line for the whole run (cargo ends on the last doc-test
# binary's own count, often 0).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "\n%s\ntests: %d passed, %d failed, %d skipped\n", compose, p, f, s }' \
  compose="$(grep '^compose: ' "$compose_log" | tail -1)" "$log"
exit "$status"

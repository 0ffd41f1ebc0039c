#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and its driver: shows what
# nvidia-smi sees, then runs the NVML test that an ordinary test run skips
# (`#[ignore]`): discovery through NVML (uuid, name, memory, utilisation,
# health) and a lease of a real GPU by the scaler against a real
# nats-server. Fails when there is no GPU.
#
#   ./scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L; then
  echo "gpu-check: no NVIDIA GPU answers here (nvidia-smi -L failed); run this on a GPU host" >&2
  exit 1
fi
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  ./scripts/install-deps.sh
fi
export PATH="$PATH:/usr/sbin"
echo "==> cargo test -p gpu-scaler --test it nvml:: -- --ignored"
cargo test -p gpu-scaler --test it nvml:: --locked -- --ignored --nocapture

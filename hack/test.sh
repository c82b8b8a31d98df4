#!/usr/bin/env bash
# README's test command: installs what the tests need, builds the pinned
# upstream etcd, and runs every test of the workspace (real etcd processes on
# 127.0.0.1; nothing else on the network).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source hack/install-deps.sh
hack/build-upstream.sh
echo "running cargo test (first build takes a few minutes)…"
# The local-cluster tests start the ste-router binary itself.
cargo build --locked -p ste-router
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "workspace: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"

#!/usr/bin/env bash
# README's test command: installs what the tests need, builds the pinned
# upstream binaries, runs every test of the workspace (real etcd,
# kube-apiserver, controller-manager, scheduler and kwok processes on
# 127.0.0.1, and real nodes' kubelets and containerds on bridges of their own
# (10.210.<k>.0/24); nothing else on the network), then kube-apiserver's own storage
# conformance suite against plain etcd (harness check) and against the router.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source hack/install-deps.sh
# Incremental state is worth nothing on a fresh checkout (every workspace
# crate is rebuilt anyway) and was the largest part of a warm target/.
export CARGO_INCREMENTAL=0
rm -rf target/debug/incremental
hack/check-disk.sh
hack/build-upstream.sh
# The real-node and install tests' images (pod sandbox, function, etcd and
# STE's three; a release build of the Rust ones); installs containerd, runc,
# buildah and the CNI plugins when missing.
hack/build-images.sh
# Formatting and lints first: a style slip fails in seconds, not after the
# tests. The lint levels live in Cargo.toml's [workspace.lints].
echo "checking formatting (cargo fmt) and lints (cargo clippy -D warnings)…"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "running cargo test (first build takes a few minutes)…"
# The local-cluster, manifests and conformance tests start these binaries themselves.
cargo build --locked -p ste-router -p ste-shard-agent -p ste-activator-bridge
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
set +e
cargo test --workspace --all-targets --locked --no-fail-fast 2>&1 | tee -a "$log"
((status |= PIPESTATUS[0]))
for target in etcd router; do
  echo "running kube-apiserver's storage conformance suite against ${target} (first compile takes a few minutes)…"
  hack/conformance/run.sh "${target}" 2>&1 | tee -a "$log"
  ((status |= PIPESTATUS[0]))
done
set -e
# One closing line for everything (cargo prints one per test binary, go test one per run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /^--- PASS/ { p++ } /^--- FAIL/ { f++ } /^--- SKIP/ { s++ }
     END { printf "all tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"

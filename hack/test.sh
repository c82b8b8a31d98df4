#!/usr/bin/env bash
# README's test command: installs what the tests need, builds the pinned
# upstream etcd, and runs every test of the workspace (real etcd processes on
# 127.0.0.1; nothing else on the network).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source hack/install-deps.sh
hack/build-upstream.sh etcd etcdctl
echo "running cargo test (first build takes a few minutes)…"
cargo test --workspace --locked

#!/usr/bin/env bash
# README's main job: the router over local RAM etcd shards, side by side with
# one plain etcd, on this machine (about a minute after the first build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source hack/install-deps.sh
hack/build-upstream.sh etcd etcdctl
echo "building ste-router and ste-bench (release; first build takes a few minutes)…"
cargo build --release --locked -p ste-router -p ste-bench
exec target/release/ste-bench router --keys 4000 --latency-ops 1000 --watch-ops 300 "$@"

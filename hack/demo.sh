#!/usr/bin/env bash
# README's main job: STE against stock, tuned and override Kubernetes, side by side on this
# machine. Starts a real local control plane on each arm in turn (durable etcd
# with an 8 ms fsync, as cloud disks have; on the STE arm pods go through
# ste-router to RAM etcd shards), sends a Deployment every 100 ms for 30 s,
# and prints create→bound latency, achieved rate and CPU per component.
# About two minutes after the first build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source hack/install-deps.sh
hack/build-upstream.sh
echo "building ste-router and ste-bench (release; first build takes a few minutes)…"
cargo build --release --locked -p ste-router -p ste-bench
exec target/release/ste-bench demo "$@"

#!/usr/bin/env bash
# The floor under one loopback hop on this machine, next to the hop through
# ste-router: raw round trips between two processes (TCP, Unix socket;
# sleeping, spinning, tokio; closed loop and paced), then gRPC calls from
# tonic against a plain RAM etcd and against ste-router over one RAM etcd
# shard (benchmarks/examples/loopback_floor.rs; docs/benchmarks.md, "The
# floor under a hop"). Loopback only; everything it starts is stopped.
#   hack/experiments/hop-floor.sh [ROUTER_BINARY] [-- example flags]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUTER=${1:-$ROOT/target/release/ste-router}
shift || true
[ "${1:-}" = "--" ] && shift
BIN=${UPSTREAM_BIN:-$ROOT/target/upstream/bin}
[ -x "$ROUTER" ] || { echo "no router binary at $ROUTER (cargo build --release -p ste-router)" >&2; exit 1; }
[ -x "$BIN/etcd" ] || { echo "no etcd in $BIN (hack/build-upstream.sh)" >&2; exit 1; }
DIR=$(mktemp -d /dev/shm/ste-hop-floor.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true; rm -rf "$DIR"' EXIT
etcd() { # name client-port
    "$BIN/etcd" --name "$1" --data-dir "$DIR/$1" --unsafe-no-fsync --quota-backend-bytes 4294967296 \
        --listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
        --listen-peer-urls "http://127.0.0.1:$(($2 + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$(($2 + 1))" \
        --initial-cluster "$1=http://127.0.0.1:$(($2 + 1))" > "$DIR/$1.log" 2>&1 &
}
etcd plain 25790
etcd shard 25890
"$ROUTER" --listen 127.0.0.1:25990 --admin-listen 127.0.0.1:25991 \
    --shards shard-0=http://127.0.0.1:25890 > "$DIR/router.log" 2>&1 &
for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:25991/readyz > /dev/null && break
    sleep 0.2
done
curl -sf http://127.0.0.1:25991/readyz > /dev/null || { echo "router not ready; see $DIR/router.log" >&2; exit 1; }
cd "$ROOT"
cargo run --quiet --release --locked -p ste-bench --example loopback_floor -- \
    --grpc plain-etcd=http://127.0.0.1:25790,ste-router=http://127.0.0.1:25990 "$@"
# Where a create's time went inside the router (means over every Txn above).
curl -sf http://127.0.0.1:25991/metrics | awk '
    /^ste_router_rpc_duration_seconds_sum\{method="Txn"\}/ { rs = $2 }
    /^ste_router_rpc_duration_seconds_count\{method="Txn"\}/ { rc = $2 }
    /^ste_router_shard_txn_duration_seconds_sum/ { ss = $2 }
    /^ste_router_shard_txn_duration_seconds_count/ { sc = $2 }
    END { if (rc > 0 && sc > 0) printf "\nste-router, mean per Txn: %.0f µs in its handler, of which %.0f µs the shard Txn\n", rs / rc * 1e6, ss / sc * 1e6 }'

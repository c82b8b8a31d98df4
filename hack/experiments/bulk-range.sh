#!/usr/bin/env bash
# Times a large range read by a gRPC-Go client (etcdctl) through ste-router
# from one RAM etcd shard: 2000 values of ~27 KB (53 MB), read 5 times.
# Used to check that the router's handling of gRPC-Go's bandwidth probes
# (router/src/coalesce.rs) does not slow bulk reads; compare two routers:
#   hack/experiments/bulk-range.sh target/release/ste-router
#   hack/experiments/bulk-range.sh /path/to/another/ste-router
# Needs etcd and etcdctl from hack/build-upstream.sh. Loopback only;
# everything it starts is stopped at the end.
set -euo pipefail
ROUTER=${1:?usage: bulk-range.sh ROUTER_BINARY}
BIN=${UPSTREAM_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/upstream/bin}
DIR=$(mktemp -d /dev/shm/ste-bulk-range.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true; rm -rf "$DIR"' EXIT
"$BIN/etcd" --name s0 --data-dir "$DIR/etcd" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster s0=http://127.0.0.1:23800 > "$DIR/etcd.log" 2>&1 &
"$ROUTER" --listen 127.0.0.1:24790 --admin-listen 127.0.0.1:24791 \
    --shards s0=http://127.0.0.1:23790 > "$DIR/router.log" 2>&1 &
for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:24791/readyz > /dev/null && break
    sleep 0.2
done
curl -sf http://127.0.0.1:24791/readyz > /dev/null || { echo "router not ready; see $DIR/router.log" >&2; exit 1; }
head -c 20000 /dev/urandom | base64 -w0 > "$DIR/value"
echo "writing 2000 values through the router..."
for i in $(seq 1 2000); do
    "$BIN/etcdctl" --endpoints 127.0.0.1:24790 put "/registry/pods/bulk/p$i" < "$DIR/value" > /dev/null
done
for i in 1 2 3 4 5; do
    start=$(date +%s%N)
    bytes=$("$BIN/etcdctl" --endpoints 127.0.0.1:24790 get --prefix /registry/pods/bulk/ | wc -c)
    end=$(date +%s%N)
    echo "read $i: $bytes bytes in $(( (end - start) / 1000000 )) ms"
done

#!/usr/bin/env bash
# What the VM's idle policy does to a hop: `ste-bench router` run in pairs,
# guest halt polling on (POLL_NS, the kernel's default 200000) and as this
# machine had it, alternating, the machine's own value restored on exit
# (docs/benchmarks.md, "Guest halt polling"). Needs root and a KVM guest
# with the cpuidle haltpoll driver. It changes a machine-wide setting for
# the length of the run: polling vCPUs keep their host cores busy while
# they poll, so run it only where that is allowed.
#   hack/experiments/halt-poll.sh [PAIRS] [POLL_NS] [-- ste-bench router flags]
# Env: STE_BENCH (the ste-bench binary; default target/release/ste-bench),
#      OUT (where the JSON goes; default a new directory under /tmp).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PAIRS=5
POLL_NS=200000
if [ $# -gt 0 ] && [ "$1" != "--" ]; then PAIRS=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then POLL_NS=$1; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi
BENCH=${STE_BENCH:-$ROOT/target/release/ste-bench}
KNOB=/sys/module/haltpoll/parameters/guest_halt_poll_ns
[[ $PAIRS =~ ^[1-9][0-9]*$ ]] || { echo "PAIRS must be a positive number, not '$PAIRS'" >&2; exit 2; }
[[ $POLL_NS =~ ^[0-9]+$ ]] || { echo "POLL_NS must be nanoseconds, not '$POLL_NS'" >&2; exit 2; }
[ -x "$BENCH" ] || { echo "no ste-bench at $BENCH (cargo build --release -p ste-bench -p ste-router)" >&2; exit 1; }
[ "$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null)" = haltpoll ] \
    || { echo "this machine's cpuidle driver is not haltpoll: guest halt polling does not apply here" >&2; exit 1; }
[ -w "$KNOB" ] || { echo "$KNOB is not writable (run as root)" >&2; exit 1; }
ORIGINAL=$(cat "$KNOB")
[ "$ORIGINAL" != "$POLL_NS" ] || { echo "guest_halt_poll_ns is already $POLL_NS: nothing to compare" >&2; exit 1; }
OUT=${OUT:-$(mktemp -d /tmp/ste-halt-poll.XXXXXX)}
mkdir -p "$OUT"
trap 'echo "$ORIGINAL" > "$KNOB"' EXIT
export PATH="${UPSTREAM_BIN:-$ROOT/target/upstream/bin}:$PATH"
for pair in $(seq 1 "$PAIRS"); do
    # Alternate which setting goes first, so drift falls on both alike.
    if ((pair % 2)); then order="$ORIGINAL $POLL_NS"; else order="$POLL_NS $ORIGINAL"; fi
    for ns in $order; do
        echo "$ns" > "$KNOB"
        echo "pair $pair/$PAIRS, guest_halt_poll_ns $ns" >&2
        "$BENCH" router --shard-counts 1,2 --transports tcp --output "$OUT/poll-$ns-$pair.json" "$@" \
            > "$OUT/poll-$ns-$pair.log" 2>&1 || { echo "ste-bench failed; see $OUT/poll-$ns-$pair.log" >&2; exit 1; }
        grep " vs plain etcd" "$OUT/poll-$ns-$pair.log" | sed "s/^/  poll $ns: /"
    done
done
echo "JSON and logs: $OUT" >&2

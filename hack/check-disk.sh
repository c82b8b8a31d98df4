#!/usr/bin/env bash
# Fails early, with the numbers, when the disk cannot hold a test run, instead
# of letting the linker or etcd's WAL preallocation die half-way with ENOSPC.
# A warm target/ that outgrew the disk is pruned of build outputs first (one
# cold rebuild is cheaper than a failed run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
need_gib="${STE_MIN_FREE_GIB:-12}"

free_gib() { df -P --block-size=1G . | awk 'NR == 2 { print $4 }'; }

free="$(free_gib)"
if (( free < need_gib )) && [[ -d target/debug ]]; then
  echo "only ${free} GiB free on $(df -P . | awk 'NR == 2 { print $6 }'); target/debug holds $(du -sh target/debug | cut -f1): removing it" >&2
  rm -rf target/debug target/release target/bench
  free="$(free_gib)"
fi
if (( free < need_gib )); then
  echo "error: ${free} GiB free on the disk holding $(pwd); a test run needs about ${need_gib} GiB" >&2
  echo "       (build outputs, Go caches, etcd WAL files under \${TMPDIR:-/tmp}); set STE_MIN_FREE_GIB to override" >&2
  exit 1
fi
echo "disk: ${free} GiB free (need ${need_gib})"

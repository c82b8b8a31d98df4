#!/usr/bin/env bash
# Fails early, with the numbers, when the disk cannot hold a test run, instead
# of letting the linker or etcd's WAL preallocation die half-way with ENOSPC.
# A test run needs about 5 GiB beyond the Go caches: ~2 GiB of target/debug
# built from scratch, Go test binaries, and etcd WAL files (64 MB each) under
# ${TMPDIR:-/tmp}. When the disk is short, build outputs the tests do not use
# go first, then the test build itself (one cold rebuild is cheaper than a
# failed run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
need_gib="${STE_MIN_FREE_GIB:-6}"
comfortable_gib=$((need_gib * 2))

free_gib() { df -P --block-size=1G . | awk 'NR == 2 { print $4 }'; }
mount_point() { df -P . | awk 'NR == 2 { print $6 }'; }

free="$(free_gib)"
if (( free < comfortable_gib )); then
  echo "only ${free} GiB free on $(mount_point): removing release builds and benchmark output under target/" >&2
  rm -rf target/release target/bench target/debug/incremental
  free="$(free_gib)"
fi
if (( free < need_gib )) && [[ -d target/debug ]]; then
  echo "still only ${free} GiB free: removing target/debug ($(du -sh target/debug | cut -f1)); it is rebuilt" >&2
  rm -rf target/debug
  free="$(free_gib)"
fi
if (( free < need_gib )); then
  echo "error: ${free} GiB free on the disk holding $(pwd) ($(mount_point)); a test run needs about ${need_gib} GiB" >&2
  echo "       (test builds, Go test binaries, etcd WAL files under \${TMPDIR:-/tmp}); free some space or set STE_MIN_FREE_GIB" >&2
  exit 1
fi
echo "disk: ${free} GiB free (a test run needs about ${need_gib})"

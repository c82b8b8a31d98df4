#!/usr/bin/env bash
# Deletes the kind cluster of hack/kind/up.sh and its local registry.
# hack/kind/state/ (certificates) is kept: delete it to start from new CAs.
set -euo pipefail
name="${STE_KIND_CLUSTER:-ste}"
kind delete cluster --name "$name"
docker rm -f kind-registry >/dev/null 2>&1 || true

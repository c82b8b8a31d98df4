#!/usr/bin/env bash
# Installs the system packages STE's build and tests need, when missing.
# Go (for the pinned upstream builds) and Rust (rustup) come with the machine;
# this script says so clearly when they are not there.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The launcher signals process groups with kill(1), not the shell's builtin.
[ -x /usr/bin/kill ] || [ -x /bin/kill ] || need_apt+=(procps)
# Real nodes (hack/test.sh's real-node and install tests): a bridge per node,
# one nat rule each for pods to reach kube-apiserver, mounts to undo.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
command -v umount >/dev/null 2>&1 || need_apt+=(mount)
if ((${#need_apt[@]})); then
  echo "installing ${need_apt[*]} (apt)…"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  if [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:${PATH}"
  else
    echo "error: Go 1.24+ is required to build the pinned etcd and Kubernetes (https://go.dev/dl)" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "${HOME}/.cargo/bin/cargo" ]; then
    export PATH="${HOME}/.cargo/bin:${PATH}"
  else
    echo "error: Rust (cargo) is required: install it with rustup (https://rustup.rs)" >&2
    exit 1
  fi
fi
# hack/test.sh checks formatting and lints; rustup installs the two
# components when the toolchain came without them.
for component in rustfmt clippy; do
  if command -v rustup >/dev/null 2>&1 && ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "${component}"
  fi
done

#!/usr/bin/env bash
# Builds the real upstream binaries STE's tests run against, from the Go
# modules pinned in this repository:
#
#   kube-apiserver, kube-controller-manager, kube-scheduler,
#   kubectl, kubelet                                         hack/k8s/go.mod
#   kube-apiserver-checked                                   hack/k8s/go.mod
#     (upstream's kube-apiserver; only its watch-cache consistency check
#     period is read from STE_WATCHCACHE_CHECK_PERIOD; source:
#     hack/k8s/kube-apiserver-checked/main.go)
#   kwok (fake kubelet)                                      hack/k8s/kwok/go.mod
#   crictl (CRI client, for real nodes' teardown)            hack/k8s/crictl/go.mod
#   etcd, etcdctl                                            hack/etcd/go.mod
#   registry, crane (a loopback OCI registry and its client,
#     go-containerregistry; real nodes pull from it)         hack/registry/go.mod
#
# Output: ${STE_UPSTREAM_BIN:-<repo>/target/upstream/bin}
#
# Usage: hack/build-upstream.sh [NAME...]   (default: all of the above)
#
# A binary is skipped when it exists and its stamp (hash of its module's
# go.mod/go.sum/*.go, the Go version and the build flags) is unchanged, so a
# second run finishes in seconds. Delete the binary or its stamp file
# (<bin>/.stamps/<name>) to force a rebuild.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${STE_UPSTREAM_BIN:-${ROOT}/target/upstream/bin}"
STAMPS="${BIN}/.stamps"
GO="${GO:-go}"

ALL=(etcd etcdctl kube-apiserver kube-apiserver-checked kube-controller-manager kube-scheduler kubectl kubelet kwok crictl registry crane)

# Modules are resolved from go.mod + go.sum as committed; -buildvcs=false keeps
# the repository's git state out of the binaries (and out of the stamps).
export GOFLAGS="-mod=mod -buildvcs=false"
# Upstream builds all of these binaries statically (all but the kubelet, which
# upstream links with cgo when it can; it builds and runs without, which keeps
# it free of the host's libc like the others).
export CGO_ENABLED=0

usage() {
  echo "usage: $0 [NAME...]   NAME: ${ALL[*]}" >&2
}

# module_dir NAME -> directory of the Go module that builds NAME
module_dir() {
  case "$1" in
    etcd | etcdctl) echo "${ROOT}/hack/etcd" ;;
    kube-apiserver | kube-apiserver-checked | kube-controller-manager | kube-scheduler | kubectl | kubelet) echo "${ROOT}/hack/k8s" ;;
    kwok) echo "${ROOT}/hack/k8s/kwok" ;;
    crictl) echo "${ROOT}/hack/k8s/crictl" ;;
    registry | crane) echo "${ROOT}/hack/registry" ;;
    *) return 1 ;;
  esac
}

# module_hash DIR -> hash of go.mod, go.sum and the module's own .go files
# (nested modules excluded).
module_hash() {
  local dir="$1"
  (
    cd "${dir}"
    {
      echo go.mod
      echo go.sum
      find . -mindepth 1 -type d -exec test -e '{}/go.mod' ';' -prune \
        -o -type f -name '*.go' -print | sed 's|^\./||'
    } | LC_ALL=C sort | xargs sha256sum
  ) | sha256sum | cut -d' ' -f1
}

# Version stamping as upstream's hack/lib/version.sh does it, so --version
# (and the apiserver's binary/emulation version) report the pinned release
# instead of v0.0.0-master.
k8s_ldflags() {
  local info version date major minor flags pkg
  info="$(cd "${ROOT}/hack/k8s" &&
    "${GO}" list -m -f '{{.Version}} {{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)"
  read -r version date <<<"${info}"
  date="${date:-1970-01-01T00:00:00Z}"
  major="${version#v}"
  major="${major%%.*}"
  minor="${version#v*.}"
  minor="${minor%%.*}"
  flags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    flags+=" -X ${pkg}.gitVersion=${version}"
    flags+=" -X ${pkg}.gitMajor=${major}"
    flags+=" -X ${pkg}.gitMinor=${minor}"
    # The module proxy does not tell us the release commit; leave it empty
    # rather than the "$Format:%H$" placeholder.
    flags+=" -X ${pkg}.gitCommit="
    flags+=" -X ${pkg}.gitTreeState=clean"
    flags+=" -X ${pkg}.buildDate=${date}"
  done
  echo "${flags}"
}

# build_args NAME -> prints the go build arguments (one per line) after -o OUT
build_args() {
  case "$1" in
    etcd | etcdctl)
      printf '%s\n' -trimpath -ldflags "-s -w" "./$1"
      ;;
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl | kubelet)
      # Same tags as upstream's non-debug builds (hack/lib/golang.sh).
      printf '%s\n' -trimpath -tags selinux,notest,grpcnotrace \
        -ldflags "$(k8s_ldflags)" "k8s.io/kubernetes/cmd/$1"
      ;;
    kube-apiserver-checked)
      # The local wrapper package, with kube-apiserver's tags and flags.
      printf '%s\n' -trimpath -tags selinux,notest,grpcnotrace \
        -ldflags "$(k8s_ldflags)" "./kube-apiserver-checked"
      ;;
    kwok)
      printf '%s\n' -trimpath -ldflags "-s -w" sigs.k8s.io/kwok/cmd/kwok
      ;;
    crictl)
      printf '%s\n' -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=v1.34.0" \
        sigs.k8s.io/cri-tools/cmd/crictl
      ;;
    registry | crane)
      printf '%s\n' -trimpath -ldflags "-s -w" "github.com/google/go-containerregistry/cmd/$1"
      ;;
  esac
}

build_one() {
  local name="$1" dir stamp_file stamp args start elapsed tmp
  dir="$(module_dir "${name}")"
  mapfile -t args < <(build_args "${name}")
  stamp="$(
    {
      module_hash "${dir}"
      "${GO}" version
      echo "GOFLAGS=${GOFLAGS} CGO_ENABLED=${CGO_ENABLED}"
      printf '%s\n' "${args[@]}"
    } | sha256sum | cut -d' ' -f1
  )"
  stamp_file="${STAMPS}/${name}"

  if [[ -x "${BIN}/${name}" && -f "${stamp_file}" && "$(<"${stamp_file}")" == "${stamp}" ]]; then
    echo "${name}: up to date"
    return 0
  fi

  echo "building ${name} (first time takes several minutes)..."
  start="${SECONDS}"
  tmp="${BIN}/.${name}.tmp.$$"
  rm -f "${stamp_file}"
  if ! (cd "${dir}" && "${GO}" build -o "${tmp}" "${args[@]}"); then
    rm -f "${tmp}"
    echo "error: building ${name} failed (module ${dir#"${ROOT}/"})" >&2
    return 1
  fi
  mv -f "${tmp}" "${BIN}/${name}"
  echo "${stamp}" >"${stamp_file}"
  elapsed=$((SECONDS - start))
  echo "built ${name} in ${elapsed}s ($(du -h "${BIN}/${name}" | cut -f1))"
}

main() {
  local names=() name
  for name in "$@"; do
    case "${name}" in
      -h | --help)
        usage
        exit 0
        ;;
    esac
    if ! module_dir "${name}" >/dev/null; then
      echo "error: unknown binary '${name}'" >&2
      usage
      exit 2
    fi
    names+=("${name}")
  done
  if [[ ${#names[@]} -eq 0 ]]; then
    names=("${ALL[@]}")
  fi

  mkdir -p "${BIN}" "${STAMPS}"

  # Serialize concurrent invocations (e.g. parallel test harnesses).
  if command -v flock >/dev/null 2>&1; then
    exec 9>"${STAMPS}/.lock"
    flock 9
  fi

  for name in "${names[@]}"; do
    build_one "${name}"
  done
  echo "upstream binaries in ${BIN}"
}

# --- Knative Serving (hack/knative/go.mod) -----------------------------------
# knative-controller, knative-autoscaler, knative-activator, knative-queue:
# Knative Serving's own components (the controller through a wrapper that
# turns off its health-probe server, see hack/knative/controller/main.go) at the release pinned in
# hack/knative/go.mod, for the activator-bridge tests and `ste-bench
# coldstart` (docs/activator-bridge.md). knative-queue is queue-proxy
# (cmd/queue), the sidecar of every revision pod; hack/build-images.sh puts
# it into an image for real nodes. Same stamp cache as above; they are part
# of the default set.
KNATIVE=(knative-controller knative-autoscaler knative-activator knative-queue)
ALL+=("${KNATIVE[@]}")
eval "_core_$(declare -f module_dir)"
eval "_core_$(declare -f build_args)"
module_dir() {
  case "$1" in
    knative-*) echo "${ROOT}/hack/knative" ;;
    *) _core_module_dir "$1" ;;
  esac
}
build_args() {
  case "$1" in
    # The controller is built from the local wrapper package
    # (hack/knative/controller: upstream's main with its health probes off,
    # which would race the autoscaler for the constant port 8080 on one host).
    knative-controller) printf '%s\n' -trimpath -ldflags "-s -w" ./controller ;;
    knative-*) printf '%s\n' -trimpath -ldflags "-s -w" "knative.dev/serving/cmd/${1#knative-}" ;;
    *) _core_build_args "$1" ;;
  esac
}


main "$@"

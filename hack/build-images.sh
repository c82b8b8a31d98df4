#!/usr/bin/env bash
# Builds STE's container images without a daemon (buildah, vfs storage,
# chroot isolation, every image FROM scratch) and exports each as a
# docker-archive that `ctr images import` loads:
#
#   ghcr.io/ste-dev/ste-router:v0.1.0            ste-router (static, musl, debug info stripped)
#   ghcr.io/ste-dev/ste-shard-agent:v0.1.0       ste-shard-agent (likewise) + etcd 3.6.6
#   ghcr.io/ste-dev/ste-activator-bridge:v0.1.0  ste-activator-bridge (likewise)
#   gcr.io/etcd-development/etcd:v3.6.6          etcd + etcdctl 3.6.6 (the bootstrap shard's image)
#   localhost/ste-pause:v0.1.0                   the pod sandbox of local real nodes (images/pause)
#   localhost/ste-function:v0.1.0                a fixed-body HTTP server on $PORT (images/function)
#   gcr.io/knative-releases/knative.dev/serving/cmd/queue:v1.15.2
#                                                Knative's queue-proxy (hack/knative's pinned
#                                                release, built by hack/build-upstream.sh
#                                                knative-queue), the name Knative's
#                                                config-deployment queue-sidecar-image gives
#
# The names are those manifests/ uses; no outside registry is needed (the etcd
# image is the etcd that hack/build-upstream.sh builds from the pinned module).
# The images hold what images/*/Dockerfile put in theirs (distroless
# cc-debian12:nonroot: /etc/passwd and /etc/group with nonroot 65532, CA
# certificates, /tmp, /home/nonroot), with the same user, ports, entrypoint and
# command.
#
# Output: ${STE_IMAGES_DIR:-<repo>/target/images}/<name>.tar (docker-archive),
# buildah's storage in <that dir>/.storage.
#
# Usage: hack/build-images.sh [--load SOCKET]... [--no-build] [NAME...]
#   NAME: pause function etcd ste-router ste-shard-agent ste-activator-bridge
#         queue-proxy (default: all)
#   --load SOCKET  then imports the archives into the containerd listening on
#                  SOCKET (namespace k8s.io, the CRI's); repeatable.
#   --no-build     only --load what is already in the output directory.
#
# Needs root (buildah's vfs storage and chroot). Installs buildah, runc,
# containerd, containernetworking-plugins and musl-tools with apt-get when
# missing, and the x86_64-unknown-linux-musl Rust target with rustup; where
# that target cannot be had, builds the Rust binaries for glibc and copies in
# exactly the shared libraries `ldd` lists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${STE_IMAGES_DIR:-${ROOT}/target/images}"
UPSTREAM_BIN="${STE_UPSTREAM_BIN:-${ROOT}/target/upstream/bin}"
MUSL_TARGET=x86_64-unknown-linux-musl
VERSION=v0.1.0
ETCD_VERSION=v3.6.6
# Knative Serving v0.42.2 is release v1.15.2 (hack/knative/go.mod); the
# image name is hack/knative/serving-ste.yaml's queue-sidecar-image.
QUEUE_IMAGE=gcr.io/knative-releases/knative.dev/serving/cmd/queue:v1.15.2
ALL=(pause function etcd ste-router ste-shard-agent ste-activator-bridge queue-proxy)

export BUILDAH_ISOLATION=chroot
# Go and Rust where the machine keeps them (as hack/install-deps.sh does).
command -v go >/dev/null 2>&1 || [[ ! -x /usr/local/go/bin/go ]] || PATH="/usr/local/go/bin:${PATH}"
command -v cargo >/dev/null 2>&1 || [[ ! -x "${HOME}/.cargo/bin/cargo" ]] || PATH="${HOME}/.cargo/bin:${PATH}"
export PATH
BUILDAH=(buildah --storage-driver vfs --root "${OUT}/.storage" --runroot "${OUT}/.run")

usage() {
  echo "usage: $0 [--load SOCKET]... [--no-build] [NAME...]   NAME: ${ALL[*]}" >&2
}

image_name() {
  case "$1" in
    pause) echo "localhost/ste-pause:${VERSION}" ;;
    function) echo "localhost/ste-function:${VERSION}" ;;
    etcd) echo "gcr.io/etcd-development/etcd:${ETCD_VERSION}" ;;
    queue-proxy) echo "${QUEUE_IMAGE}" ;;
    ste-router | ste-shard-agent | ste-activator-bridge) echo "ghcr.io/ste-dev/$1:${VERSION}" ;;
    *) return 1 ;;
  esac
}

log() { echo "build-images: $*"; }

ensure_packages() {
  local need=()
  command -v buildah >/dev/null 2>&1 || need+=(buildah)
  command -v runc >/dev/null 2>&1 || need+=(runc)
  command -v containerd >/dev/null 2>&1 || need+=(containerd)
  [[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
  command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
  command -v strip >/dev/null 2>&1 || need+=(binutils)
  command -v musl-gcc >/dev/null 2>&1 || need+=(musl-tools)
  command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
  if ((${#need[@]})); then
    log "installing ${need[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# The base every image starts from: what distroless/cc-debian12:nonroot gives
# besides its libraries (the binaries here need none, or bring their own).
make_base() {
  local base="$1"
  rm -rf "${base}"
  mkdir -p "${base}/etc/ssl/certs" "${base}/tmp" "${base}/home/nonroot" "${base}/root"
  chmod 1777 "${base}/tmp"
  chmod 0700 "${base}/root"
  chown 65532:65532 "${base}/home/nonroot"
  cat >"${base}/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"${base}/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "${base}/etc/ssl/certs/ca-certificates.crt"
  fi
}

# --- binaries -----------------------------------------------------------------

build_pause() {
  local cc=gcc
  command -v musl-gcc >/dev/null 2>&1 && cc=musl-gcc
  "${cc}" -static -Os -s -Wall -o "${STAGE}/pause" "${ROOT}/images/pause/pause.c"
}

build_function() {
  (cd "${ROOT}/images/function" &&
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags "-s -w" -o "${STAGE}/function" .)
}

RUST_MODE=""
RUST_BUILT=""
# rust_build -> builds the three Rust binaries once (static when it can).
rust_build() {
  [[ -n "${RUST_BUILT}" ]] && return 0
  local pkgs=(-p ste-router -p ste-shard-agent -p ste-activator-bridge)
  if rustup target list --installed 2>/dev/null | grep -qx "${MUSL_TARGET}" ||
    rustup target add "${MUSL_TARGET}" >/dev/null 2>&1; then
    RUST_MODE=musl
    log "cargo build --release --target ${MUSL_TARGET} (static)"
    (cd "${ROOT}" && CARGO_INCREMENTAL=0 CC_x86_64_unknown_linux_musl=musl-gcc \
      cargo build --release --locked --target "${MUSL_TARGET}" "${pkgs[@]}")
  else
    RUST_MODE=glibc
    log "no ${MUSL_TARGET} target: cargo build --release (glibc; ldd's libraries are copied in)"
    (cd "${ROOT}" && CARGO_INCREMENTAL=0 cargo build --release --locked "${pkgs[@]}")
  fi
  RUST_BUILT=1
}

# rust_binary NAME -> path of the built binary
rust_binary() {
  if [[ "${RUST_MODE}" == musl ]]; then
    echo "${ROOT}/target/${MUSL_TARGET}/release/$1"
  else
    echo "${ROOT}/target/release/$1"
  fi
}

# copy_libs BIN ROOTFS -> copies the shared libraries BIN loads (ldd) into ROOTFS
copy_libs() {
  local bin="$1" rootfs="$2" lib
  if ! ldd "${bin}" >/dev/null 2>&1; then
    return 0 # static
  fi
  while read -r lib; do
    [[ -n "${lib}" ]] || continue
    mkdir -p "${rootfs}$(dirname "${lib}")"
    cp -L "${lib}" "${rootfs}${lib}"
  done < <(ldd "${bin}" | awk '/=> \// {print $3} /^\t\// {print $1}')
}

ensure_etcd() {
  if [[ ! -x "${UPSTREAM_BIN}/etcd" || ! -x "${UPSTREAM_BIN}/etcdctl" ]]; then
    "${ROOT}/hack/build-upstream.sh" etcd etcdctl
  fi
  local v
  v="$("${UPSTREAM_BIN}/etcd" --version | awk '/^etcd Version:/ {print $3}')"
  if [[ "v${v}" != "${ETCD_VERSION}" ]]; then
    echo "error: ${UPSTREAM_BIN}/etcd is ${v}, the images need ${ETCD_VERSION}" >&2
    exit 1
  fi
}

ensure_queue() {
  if [[ ! -x "${UPSTREAM_BIN}/knative-queue" ]]; then
    "${ROOT}/hack/build-upstream.sh" knative-queue
  fi
}

# --- images -------------------------------------------------------------------

# commit NAME CONTAINER -> commits, exports target/images/NAME.tar, prints size
commit_and_export() {
  local name="$1" ctr="$2" image archive
  image="$(image_name "${name}")"
  archive="${OUT}/${name}.tar"
  "${BUILDAH[@]}" rmi -f "${image}" >/dev/null 2>&1 || true
  "${BUILDAH[@]}" commit -q --rm --timestamp 0 "${ctr}" "${image}" >/dev/null
  rm -f "${archive}"
  "${BUILDAH[@]}" push -q "${image}" "docker-archive:${archive}:${image}"
  log "${image} -> ${archive#"${ROOT}/"} ($(du -h "${archive}" | cut -f1))"
}

# new_container NAME ROOTFS -> a scratch container holding ROOTFS (added as a
# tar: `buildah add` keeps its owners and modes, `buildah copy` would not)
new_container() {
  local ctr
  tar --numeric-owner --sort=name --mtime=@0 -C "$2" -cf "$2.tar" .
  ctr="$("${BUILDAH[@]}" from --name "ste-build-$1-$$" scratch)"
  "${BUILDAH[@]}" add -q "${ctr}" "$2.tar" / >/dev/null
  echo "${ctr}"
}

build_image() {
  local name="$1" rootfs="${STAGE}/rootfs-$1" ctr bin
  cp -a "${STAGE}/base" "${rootfs}"
  case "${name}" in
    pause)
      build_pause
      install -m 0755 "${STAGE}/pause" "${rootfs}/pause"
      ctr="$(new_container "${name}" "${rootfs}")"
      "${BUILDAH[@]}" config --user 65535:65535 --entrypoint '["/pause"]' "${ctr}"
      ;;
    function)
      build_function
      install -m 0755 "${STAGE}/function" "${rootfs}/function"
      ctr="$(new_container "${name}" "${rootfs}")"
      "${BUILDAH[@]}" config --user 65532:65532 --env PORT=8080 --port 8080 \
        --entrypoint '["/function"]' "${ctr}"
      ;;
    etcd)
      # As etcd's own release image: the binaries, /var/etcd and
      # /var/lib/etcd, ports 2379/2380, CMD etcd.
      ensure_etcd
      install -D -m 0755 "${UPSTREAM_BIN}/etcd" "${rootfs}/usr/local/bin/etcd"
      install -D -m 0755 "${UPSTREAM_BIN}/etcdctl" "${rootfs}/usr/local/bin/etcdctl"
      mkdir -p "${rootfs}/var/etcd" "${rootfs}/var/lib/etcd"
      ctr="$(new_container "${name}" "${rootfs}")"
      "${BUILDAH[@]}" config --workingdir /var/lib/etcd --port 2379 --port 2380 \
        --cmd '["/usr/local/bin/etcd"]' "${ctr}"
      ;;
    queue-proxy)
      # As Knative's release image (ko, distroless static): the binary at
      # /ko-app/queue, user 65532 (the pod spec Knative writes asks
      # runAsNonRoot and gives no command).
      ensure_queue
      install -D -m 0755 "${UPSTREAM_BIN}/knative-queue" "${rootfs}/ko-app/queue"
      ctr="$(new_container "${name}" "${rootfs}")"
      "${BUILDAH[@]}" config --user 65532:65532 --env KO_DATA_PATH=/var/run/ko \
        --entrypoint '["/ko-app/queue"]' "${ctr}"
      ;;
    ste-router | ste-shard-agent | ste-activator-bridge)
      rust_build
      bin="$(rust_binary "${name}")"
      install -D -m 0755 "${bin}" "${rootfs}/usr/local/bin/${name}"
      # The release profile's line tables are 3/4 of the binary (~100 MB);
      # symbols stay (panics still name functions), as in the Dockerfiles.
      strip --strip-debug "${rootfs}/usr/local/bin/${name}"
      copy_libs "${bin}" "${rootfs}"
      if [[ "${name}" == ste-shard-agent ]]; then
        ensure_etcd
        install -D -m 0755 "${UPSTREAM_BIN}/etcd" "${rootfs}/usr/local/bin/etcd"
      fi
      ctr="$(new_container "${name}" "${rootfs}")"
      local extra=()
      case "${name}" in
        ste-router) extra=(--port 2479 --port 2480) ;;
        ste-shard-agent) extra=(--port 2379 --port 9482 --cmd '["run"]') ;;
        ste-activator-bridge) extra=(--port 9464) ;;
      esac
      "${BUILDAH[@]}" config --user 65532:65532 "${extra[@]}" \
        --entrypoint "[\"/usr/local/bin/${name}\"]" "${ctr}"
      ;;
  esac
  commit_and_export "${name}" "${ctr}"
}

load_into() {
  local socket="$1" name archive
  for name in "${NAMES[@]}"; do
    archive="${OUT}/${name}.tar"
    if [[ ! -f "${archive}" ]]; then
      echo "error: ${archive} is missing: run $0 ${name}" >&2
      exit 1
    fi
    ctr -a "${socket}" -n k8s.io images import "${archive}" >/dev/null
    log "loaded $(image_name "${name}") into ${socket}"
  done
}

main() {
  local sockets=() build=1
  NAMES=()
  while (($#)); do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      --load)
        [[ $# -ge 2 ]] || {
          usage
          exit 2
        }
        sockets+=("$2")
        shift
        ;;
      --no-build) build=0 ;;
      *)
        if ! image_name "$1" >/dev/null; then
          echo "error: unknown image '$1'" >&2
          usage
          exit 2
        fi
        NAMES+=("$1")
        ;;
    esac
    shift
  done
  ((${#NAMES[@]})) || NAMES=("${ALL[@]}")
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: $0 needs root (buildah vfs storage, containerd)" >&2
    exit 1
  fi
  ensure_packages
  mkdir -p "${OUT}"

  if ((build)); then
    # One build at a time per output directory.
    exec 9>"${OUT}/.lock"
    flock 9
    STAGE="$(mktemp -d "${OUT}/.stage.XXXXXX")"
    trap 'rm -rf "${STAGE}"' EXIT
    make_base "${STAGE}/base"
    local name
    for name in "${NAMES[@]}"; do
      build_image "${name}"
    done
  fi
  local socket
  for socket in "${sockets[@]}"; do
    load_into "${socket}"
  done
}

main "$@"

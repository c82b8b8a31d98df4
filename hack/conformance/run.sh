#!/usr/bin/env bash
# Runs kube-apiserver's storage conformance suite (this Go module) against
#   etcd    one plain etcd                       (checks the harness)
#   router  ste-router over 3 etcd shards        (checks the router)
#   <url>   an endpoint you already run          (STE_CONFORMANCE_PROGRESS_NOTIFY
#           is left as you set it: see README.md)
# Extra arguments go to `go test`, e.g. -run 'TestWatch.*'.
#
# Binaries: $STE_UPSTREAM_BIN (default target/upstream/bin, built by
# hack/build-upstream.sh) and $STE_ROUTER_BIN (default target/debug/ste-router,
# built by `cargo build -p ste-router`). Everything listens on 127.0.0.1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
BIN="${STE_UPSTREAM_BIN:-${ROOT}/target/upstream/bin}"
ROUTER="${STE_ROUTER_BIN:-${ROOT}/target/debug/ste-router}"

mode="${1:-}"
if [[ -z "${mode}" ]]; then
  echo "usage: $0 etcd|router|<endpoint-url> [go test args...]" >&2
  exit 2
fi
shift

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ste-conformance.XXXXXX")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "${pid}" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "${pid}" 2>/dev/null || true; done
  rm -rf "${WORK}"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_etcd NAME [extra etcd flags...]; sets ETCD_URL (not in a subshell: PIDS must see it)
start_etcd() {
  local name="$1"; shift
  local cport pport
  cport="$(free_port)"; pport="$(free_port)"
  "${BIN}/etcd" --name "${name}" --data-dir "${WORK}/${name}" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:${cport}" --advertise-client-urls "http://127.0.0.1:${cport}" \
    --listen-peer-urls "http://127.0.0.1:${pport}" --initial-advertise-peer-urls "http://127.0.0.1:${pport}" \
    --initial-cluster "${name}=http://127.0.0.1:${pport}" --log-level warn "$@" \
    >"${WORK}/${name}.log" 2>&1 &
  PIDS+=($!)
  local url="http://127.0.0.1:${cport}"
  for _ in $(seq 100); do
    "${BIN}/etcdctl" --endpoints "${url}" endpoint health >/dev/null 2>&1 && { ETCD_URL="${url}"; return; }
    sleep 0.1
  done
  echo "etcd ${name} did not become healthy; log:" >&2
  cat "${WORK}/${name}.log" >&2
  exit 1
}

case "${mode}" in
  etcd)
    # Upstream's TestProgressNotify runs its embedded etcd with a 1s interval.
    start_etcd plain --watch-progress-notify-interval=1s
    endpoint="${ETCD_URL}"
    export STE_CONFORMANCE_PROGRESS_NOTIFY=1s
    ;;
  router)
    shards=()
    for i in 0 1 2; do start_etcd "s${i}"; shards+=("s${i}=${ETCD_URL}"); done
    lport="$(free_port)"; aport="$(free_port)"
    "${ROUTER}" --listen "127.0.0.1:${lport}" --admin-listen "127.0.0.1:${aport}" \
      --progress-interval 1s --shards "$(IFS=,; echo "${shards[*]}")" \
      >"${WORK}/router.log" 2>&1 &
    PIDS+=($!)
    ready=""
    for _ in $(seq 100); do
      curl -fsS "http://127.0.0.1:${aport}/readyz" >/dev/null 2>&1 && { ready=1; break; }
      sleep 0.1
    done
    if [[ -z "${ready}" ]]; then
      echo "ste-router did not become ready; log:" >&2
      cat "${WORK}/router.log" >&2
      exit 1
    fi
    endpoint="http://127.0.0.1:${lport}"
    export STE_CONFORMANCE_PROGRESS_NOTIFY=1s
    ;;
  *)
    endpoint="${mode}"
    ;;
esac

echo "conformance endpoint: ${endpoint} (${mode})" >&2
export STE_CONFORMANCE_ENDPOINT="${endpoint}"
cd "${HERE}"
set +e
GOFLAGS="${GOFLAGS:+${GOFLAGS} }-mod=mod" go test -count=1 -v -timeout 20m ./... "$@" 2>&1 | tee "${WORK}/go-test.log"
rc="${PIPESTATUS[0]}"
set -e
if [[ "${rc}" != 0 && "${mode}" == router ]]; then
  echo "--- router log (last 50 lines):" >&2
  tail -n 50 "${WORK}/router.log" >&2
fi

# The skipped tests are pinned per target (skips/<target>.txt): a test that
# starts skipping (a harness or endpoint change, a missing setting) fails the
# run instead of passing unnoticed. With extra go test arguments (-run …) only
# new skips are reported; a full, passing run also reports a pinned skip that
# no longer happens, so the list stays exact.
expected="${HERE}/skips/${mode}.txt"
if [[ -f "${expected}" ]]; then
  grep -v '^#' "${expected}" | sed '/^[[:space:]]*$/d' | sort -u >"${WORK}/skips-expected"
  sed -n 's/^[[:space:]]*--- SKIP: \([^ ]*\).*/\1/p' "${WORK}/go-test.log" | sort -u >"${WORK}/skips-seen"
  skips_ok=1
  unexpected="$(comm -13 "${WORK}/skips-expected" "${WORK}/skips-seen")"
  if [[ -n "${unexpected}" ]]; then
    echo "conformance (${mode}): FAIL: test(s) skipped that ${expected#"${ROOT}/"} does not list:" >&2
    sed 's/^/  /' <<<"${unexpected}" >&2
    echo "  make them run, or add them to that file with the reason in docs/conformance.md" >&2
    skips_ok=""
  fi
  # (Only when every test ran and passed: a failed build lists no skip.)
  if [[ $# == 0 && "${rc}" == 0 ]]; then
    gone="$(comm -23 "${WORK}/skips-expected" "${WORK}/skips-seen")"
    if [[ -n "${gone}" ]]; then
      echo "conformance (${mode}): FAIL: test(s) listed in ${expected#"${ROOT}/"} no longer skip; remove them from it:" >&2
      sed 's/^/  /' <<<"${gone}" >&2
      skips_ok=""
    fi
  fi
  if [[ -n "${skips_ok}" ]]; then
    echo "conformance (${mode}): the skipped tests are the $(wc -l <"${WORK}/skips-expected") pinned in ${expected#"${ROOT}/"}" >&2
  else
    rc=1
  fi
fi
exit "${rc}"

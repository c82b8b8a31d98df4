#!/usr/bin/env bash
# Regenerates the vendored Knative YAML in this directory from the Go
# modules pinned in go.mod (Apache-2.0, The Knative Authors; see LICENSE):
#
#   serving-crds.yaml    CRDs of serving, networking (SKS, Ingress, Certificate,
#                        ClusterDomainClaim) and caching (Image)
#   serving-config.yaml  the knative-serving namespace and its config maps
#
# Usage: hack/knative/vendor.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export GOFLAGS="-mod=mod"
dir() { go list -m -f '{{.Dir}}' "$1"; }
SERVING="$(dir knative.dev/serving)"
NETWORKING="$(dir knative.dev/networking)"
CACHING="$(dir knative.dev/caching)"
VERSION="$(go list -m -f '{{.Version}}' knative.dev/serving)"

emit() {
  local f
  for f in "$@"; do
    echo "---"
    echo "# from ${f#/root/go/pkg/mod/}"
    # Drop the license headers and leading document separators of each file.
    sed -e '/^# Copyright/,/^# limitations under the License./d' -e '1{/^---$/d}' "$f"
  done
}

{
  echo "# Knative Serving ${VERSION} CRDs, vendored by hack/knative/vendor.sh (Apache-2.0, The Knative Authors)."
  emit "${SERVING}"/config/core/300-resources/*.yaml \
    "${NETWORKING}"/config/serverlessservice.yaml "${NETWORKING}"/config/ingress.yaml \
    "${NETWORKING}"/config/certificate.yaml "${NETWORKING}"/config/domain-claim.yaml \
    "${CACHING}"/config/image.yaml
} >serving-crds.yaml

{
  echo "# Knative Serving ${VERSION} namespace and config maps, vendored by hack/knative/vendor.sh (Apache-2.0, The Knative Authors)."
  emit "${SERVING}"/config/core/100-namespace.yaml "${SERVING}"/config/core/configmaps/*.yaml \
    "${NETWORKING}"/config/config-network.yaml
} >serving-config.yaml

cp "${SERVING}/LICENSE" LICENSE
echo "vendored Knative Serving ${VERSION} into $(pwd)"

#!/usr/bin/env bash
# A local kind cluster (1 control plane, 2 workers) with STE from its first
# boot: pods are stored through ste-router, everything else in kind's etcd.
#
#   hack/kind/up.sh            # builds the images, creates the cluster "ste"
#   hack/kind/down.sh          # deletes it (and the local registry)
#
# Needs docker (with BuildKit), kind >= 0.30, kubectl and openssl. Run from
# anywhere; it works in the repository root (kind resolves the config's
# relative mount paths there). What it does, in order (docs/install.md):
#   1. CAs that kubeadm will adopt (etcd CA, cluster CA) and STE's
#      certificates (hack/gen-certs.sh), the router's kubeconfig (client
#      certificate of user ste:router), all under hack/kind/state/;
#   2. a local registry on kind's Docker network that mirrors ghcr.io;
#   3. the three images, built and pushed to it;
#   4. the cluster (hack/kind/cluster.yaml): the router and the bootstrap
#      shard start with the control plane; then `kubectl apply -f manifests/`
#      with the shards' Secret and the kind network in the NetworkPolicy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

name="${STE_KIND_CLUSTER:-ste}"
version="${STE_VERSION:-v0.1.0}"
state=hack/kind/state
registry=kind-registry
registry_port="${STE_KIND_REGISTRY_PORT:-5001}"
images=(ste-router ste-shard-agent ste-activator-bridge)
ctx="kind-${name}"
for tool in docker kind kubectl openssl; do
  command -v "$tool" >/dev/null || { echo "up.sh: $tool not found" >&2; exit 1; }
done

echo "1/4 certificates in ${state}/"
mkdir -p "$state/etcd-ca" "$state/kube-ca" "$state/router-cache" "$state/certs.d/ghcr.io"
make_ca() { # dir, common name
  [[ -s "$1/ca.key" && -s "$1/ca.crt" ]] && return
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1/ca.key" -out "$1/ca.crt" -days 3650 -sha256 \
    -subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign,cRLSign" 2>/dev/null
}
make_ca "$state/etcd-ca" etcd-ca
make_ca "$state/kube-ca" kubernetes
hack/gen-certs.sh "$state/ste" --etcd-ca "$state/etcd-ca/ca" --kube-ca "$state/kube-ca/ca" >/dev/null
cp "$state/kube-ca/ca.crt" "$state/ste/kube-ca.crt"
cat >"$state/ste-router.conf" <<CONF
apiVersion: v1
kind: Config
clusters:
- name: kind
  cluster: {server: "https://${name}-control-plane:6443", certificate-authority: /etc/kubernetes/pki/ste/kube-ca.crt}
users:
- name: ste-router
  user: {client-certificate: /etc/kubernetes/pki/ste/router-kube.crt, client-key: /etc/kubernetes/pki/ste/router-kube.key}
contexts:
- name: ste-router
  context: {cluster: kind, user: ste-router}
current-context: ste-router
CONF
# The static pods run as uid 65532 and see these files through bind mounts
# that keep your uid: readable by all (a local test cluster only).
chmod 0755 "$state/ste"
chmod 0644 "$state/ste"/* "$state/ste-router.conf"
chmod 0777 "$state/router-cache"

echo "2/4 local registry ${registry} (localhost:${registry_port}), mirroring ghcr.io"
docker network inspect kind >/dev/null 2>&1 || docker network create kind >/dev/null
if [[ "$(docker inspect -f '{{.State.Running}}' "$registry" 2>/dev/null || true)" != true ]]; then
  docker run -d --restart=always -p "127.0.0.1:${registry_port}:5000" --network kind --name "$registry" registry:2 >/dev/null
fi
cat >"$state/certs.d/ghcr.io/hosts.toml" <<TOML
server = "https://ghcr.io"

[host."http://${registry}:5000"]
  capabilities = ["pull", "resolve"]
TOML

echo "3/4 images"
for image in "${images[@]}"; do
  docker build -f "images/${image}/Dockerfile" -t "ghcr.io/ste-dev/${image}:${version}" .
  docker tag "ghcr.io/ste-dev/${image}:${version}" "localhost:${registry_port}/ste-dev/${image}:${version}"
  docker push "localhost:${registry_port}/ste-dev/${image}:${version}"
done

echo "4/4 cluster ${name}"
kind create cluster --name "$name" --config hack/kind/cluster.yaml
kubectl --context "$ctx" apply -f manifests/00-crd-shards.yaml -f manifests/01-namespace.yaml
kubectl --context "$ctx" -n ste-system create secret generic ste-shard-tls \
  --from-file=ca.crt="$state/ste/ca.crt" \
  --from-file=tls.crt="$state/ste/shard-server.crt" --from-file=tls.key="$state/ste/shard-server.key" \
  --from-file=client.crt="$state/ste/shard-agent-client.crt" --from-file=client.key="$state/ste/shard-agent-client.key" \
  --dry-run=client -o yaml | kubectl --context "$ctx" apply -f -
# The routers reach the shards from the control-plane node's address on kind's network.
subnet="$(docker network inspect kind -f '{{range .IPAM.Config}}{{println .Subnet}}{{end}}' | grep -m1 '\.')"
rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
cp manifests/*.yaml "$rendered/"
sed -i "s|172.18.0.0/16|${subnet}|" "$rendered/05-network-policies.yaml"
kubectl --context "$ctx" apply -f "$rendered/"
kubectl --context "$ctx" -n ste-system rollout status daemonset/ste-shard-agent --timeout=300s
kubectl --context "$ctx" get shards
echo "ready: kubectl --context ${ctx} …  (router admin: docker exec ${name}-control-plane curl -s 127.0.0.1:2480/readyz)"

#!/usr/bin/env bash
# Certificates for STE's mTLS, with openssl only.
#
#   hack/gen-certs.sh OUT_DIR [--etcd-ca PREFIX] [--kube-ca PREFIX] [--days N]
#                     [--shard-san SAN]... [--router-san SAN]...
#
# Writes into OUT_DIR (created; existing files are kept, so a second run only
# adds what is missing — delete a file to re-issue it):
#
#   ca.crt, ca.key                   the STE CA: signs everything below except
#                                    router-server when --etcd-ca is given
#   router-server.crt/.key           the router's serving cert (SAN 127.0.0.1,
#                                    ::1, localhost, plus every --router-san),
#                                    what kube-apiserver connects to
#   apiserver-client.crt/.key        a client cert for kube-apiserver → router
#                                    (only needed when kube-apiserver does not
#                                    already have an --etcd-certfile the router trusts)
#   router-client.crt/.key           the router's client cert towards the shards
#   shard-server.crt/.key            the shards' serving cert (shared by every
#                                    shard-agent; SAN DNS:ste-shard, localhost,
#                                    127.0.0.1, plus every --shard-san)
#   shard-agent-client.crt/.key      the shard-agent's client cert towards its own etcd
#   bootstrap-shard.crt/.key         the bootstrap shard's serving cert (127.0.0.1, localhost, DNS:ste-shard: the router checks every shard against that name)
#   router-trusted-ca.crt            CA bundle the router trusts for its clients
#   router-kube.crt/.key             only with --kube-ca: the router's client cert
#                                    for kube-apiserver (user ste:router), signed
#                                    by the cluster CA PREFIX.crt/.key
#
# --etcd-ca PREFIX signs router-server with PREFIX.crt/PREFIX.key — on kubeadm
# and kind that is /etc/kubernetes/pki/etcd/ca: kube-apiserver then keeps its
# existing --etcd-cafile/--etcd-certfile/--etcd-keyfile for the router too (it
# has one TLS config for every etcd backend), and router-trusted-ca.crt is the
# etcd CA (which signed kube-apiserver's apiserver-etcd-client.crt).
# A --shard-san / --router-san is DNS:name, IP:addr, or a bare name/address.
set -euo pipefail

usage() {
  sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage 0 ;; esac
out="$1"
shift
etcd_ca=""
kube_ca=""
days=365
extra_sans=()
router_sans=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --etcd-ca) etcd_ca="${2:?--etcd-ca needs a path prefix}"; shift 2 ;;
    --kube-ca) kube_ca="${2:?--kube-ca needs a path prefix}"; shift 2 ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --shard-san) extra_sans+=("${2:?--shard-san needs a value}"); shift 2 ;;
    --router-san) router_sans+=("${2:?--router-san needs a value}"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "gen-certs.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[[ "$days" =~ ^[0-9]+$ ]] || { echo "gen-certs.sh: --days must be a number, got '$days'" >&2; exit 2; }
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl not found" >&2; exit 1; }
for prefix in "$etcd_ca" "$kube_ca"; do
  [[ -n "$prefix" ]] || continue
  for f in "$prefix.crt" "$prefix.key"; do
    [[ -r "$f" ]] || { echo "gen-certs.sh: cannot read $f (CA prefix $prefix)" >&2; exit 1; }
  done
done

mkdir -p "$out"
chmod 700 "$out"
cd "$out"
umask 077

san_list() { # bare values → DNS:/IP: entries
  local entries=() v
  for v in "$@"; do
    case "$v" in
      DNS:*|IP:*) entries+=("$v") ;;
      *[!0-9.]*) if [[ "$v" == *:* ]]; then entries+=("IP:$v"); else entries+=("DNS:$v"); fi ;;
      *) entries+=("IP:$v") ;;
    esac
  done
  local IFS=,
  echo "${entries[*]}"
}

# issue NAME CN USAGE(server|client) CA_PREFIX [SAN...]
issue() {
  local name="$1" cn="$2" usage="$3" ca="$4"
  shift 4
  if [[ -s "$name.crt" && -s "$name.key" ]]; then
    echo "kept   $out/$name.crt"
    return
  fi
  local ext
  ext="$(mktemp)"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ "$usage" == server ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$(san_list "$@")"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" -subj "/O=ste/CN=$cn" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$ext"
  echo "issued $out/$name.crt (CN=$cn)"
}

if [[ ! -s ca.crt || ! -s ca.key ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days $((days * 10)) -sha256 \
    -subj "/O=ste/CN=ste-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "issued $out/ca.crt (CN=ste-ca)"
else
  echo "kept   $out/ca.crt"
fi

router_ca="$PWD/ca"
if [[ -n "$etcd_ca" ]]; then
  [[ "$etcd_ca" == /* ]] || etcd_ca="$OLDPWD/$etcd_ca"
  router_ca="$etcd_ca"
fi
if [[ -n "$kube_ca" ]]; then
  [[ "$kube_ca" == /* ]] || kube_ca="$OLDPWD/$kube_ca"
fi
# The bundle goes with the CA that signed router-server: kept with it.
if [[ ! -s router-trusted-ca.crt || ! -s router-server.crt ]]; then
  cp "$router_ca.crt" router-trusted-ca.crt
fi

issue router-server ste-router server "$router_ca" 127.0.0.1 ::1 localhost ${router_sans[@]+"${router_sans[@]}"}
issue apiserver-client kube-apiserver-etcd-client client "$router_ca"
issue router-client ste-router client "$PWD/ca"
issue shard-server ste-shard server "$PWD/ca" ste-shard localhost 127.0.0.1 ${extra_sans[@]+"${extra_sans[@]}"}
issue shard-agent-client ste-shard-agent client "$PWD/ca"
issue bootstrap-shard ste-bootstrap-shard server "$PWD/ca" 127.0.0.1 localhost ste-shard
if [[ -n "$kube_ca" ]]; then
  issue router-kube ste:router client "$kube_ca"
fi
chmod 644 ./*.crt
rm -f ./*.srl

cat <<EOF

Next steps (docs/install.md):
  # the shard-agent DaemonSet's Secret (namespace ste-system, from manifests/01-namespace.yaml):
  kubectl -n ste-system create secret generic ste-shard-tls \\
    --from-file=ca.crt=$out/ca.crt \\
    --from-file=tls.crt=$out/shard-server.crt --from-file=tls.key=$out/shard-server.key \\
    --from-file=client.crt=$out/shard-agent-client.crt --from-file=client.key=$out/shard-agent-client.key \\
    --dry-run=client -o yaml | kubectl apply -f -
  # every control-plane node (static pods cannot mount Secrets): copy into /etc/kubernetes/pki/ste/
  #   ca.crt router-trusted-ca.crt router-server.{crt,key} router-client.{crt,key} bootstrap-shard.{crt,key}
  # Keep ca.key offline: it is only needed to issue certificates.
EOF

#!/bin/sh
# Issue this container's certificate for Ray's own TLS, then run the command given (if any).
#
# Ray's processes reach one another by IP address and check that address against the
# peer's certificate, so every Ray node, and every Ray client (the gateways), needs a
# certificate naming its own addresses, which are only known once the container runs.
# This signs one with the cluster's Ray CA: a fresh P-256 key, valid 7 days (restart the
# container to renew), for serverAuth and clientAuth (Ray's TLS is mutual).
#
#   RAY_TLS_CA_CERT       the Ray CA's certificate (a secret)
#   RAY_TLS_CA_KEY        the Ray CA's private key (a secret: mount it only where needed;
#                         on Kubernetes only into the init container that runs this)
#   RAY_TLS_SERVER_CERT   where to write the certificate (e.g. /tmp/ray-tls/tls.crt)
#   RAY_TLS_SERVER_KEY    where to write its key (mode 0600)
#   POD_IP                optional: the address to name (Kubernetes' downward API);
#                         otherwise every address `hostname -I` lists
#   RAY_TLS_EXTRA_NAMES   optional: more subjectAltName entries, comma-separated
#                         (e.g. DNS:bastion-ray-head-svc.bastion-ray.svc, which the
#                         gateways dial)
set -eu

: "${RAY_TLS_CA_CERT:?}" "${RAY_TLS_CA_KEY:?}" "${RAY_TLS_SERVER_CERT:?}" "${RAY_TLS_SERVER_KEY:?}"
umask 077
mkdir -p "$(dirname "$RAY_TLS_SERVER_CERT")" "$(dirname "$RAY_TLS_SERVER_KEY")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

names="DNS:localhost,DNS:$(hostname),IP:127.0.0.1"
for ip in ${POD_IP:-$(hostname -I)}; do
  names="$names,IP:$ip"
done
if [ -n "${RAY_TLS_EXTRA_NAMES:-}" ]; then
  names="$names,$RAY_TLS_EXTRA_NAMES"
fi

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$RAY_TLS_SERVER_KEY" -out "$work/node.csr" -subj "/CN=$(hostname)"
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\n' \
  "$names" > "$work/ext.cnf"
openssl x509 -req -in "$work/node.csr" -CA "$RAY_TLS_CA_CERT" -CAkey "$RAY_TLS_CA_KEY" \
  -CAserial "$work/ca.srl" -CAcreateserial -days 7 -sha256 -extfile "$work/ext.cnf" \
  -out "$RAY_TLS_SERVER_CERT"
chmod 0600 "$RAY_TLS_SERVER_KEY"
chmod 0644 "$RAY_TLS_SERVER_CERT"

if [ "$#" -gt 0 ]; then
  exec "$@"
fi

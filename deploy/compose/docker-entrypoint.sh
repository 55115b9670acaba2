#!/bin/sh
# Entry point of Bastion's image (deploy/compose/Dockerfile).
#
# 1. A setting that holds a password may come from a file: BASTION_DATABASE_URL_FILE,
#    BASTION_REDIS_URL_FILE, BASTION_TRANSIT_TOKEN_FILE name a file (a Docker secret) whose
#    content becomes BASTION_DATABASE_URL, ... for the command, so that the value is in
#    no compose file and not in `docker inspect`.
# 2. With Ray's TLS on and the Ray CA's key at hand (RAY_TLS_CA_KEY), this container's
#    Ray certificate is issued first (ray-node-cert.sh). Kubernetes does both with
#    secretKeyRef and an init container instead, and bypasses this script.
set -eu

for name in BASTION_DATABASE_URL BASTION_REDIS_URL BASTION_TRANSIT_TOKEN; do
  eval "file=\${${name}_FILE:-}"
  if [ -n "$file" ]; then
    eval "given=\${${name}:-}"
    if [ -n "$given" ]; then
      echo "docker-entrypoint: set ${name} or ${name}_FILE, not both" >&2
      exit 64
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
  fi
done

if [ "${RAY_USE_TLS:-0}" = 1 ] && [ -n "${RAY_TLS_CA_KEY:-}" ]; then
  ray-node-cert.sh
fi

exec "$@"

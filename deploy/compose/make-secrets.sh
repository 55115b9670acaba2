#!/bin/sh
# Create the secrets deploy/compose/compose.yaml mounts (Docker's file-based secrets), in
# ./secrets next to this script. Run it once, as root (it hands each file to the uid of
# the container that reads it), before the first `docker compose up`:
#
#   sudo ./make-secrets.sh
#
# A file-based secret is bind-mounted with the owner and mode it has here (Compose cannot
# change them), so each file is owned by the user of the one service that reads it and
# readable by that user only:
#
#   master.key        Bastion's master key (format of src/bastion/crypto/master_key.py),
#                     0600, uid 10001: the gateways, `init`. Back it up offline: every
#                     sealed key in the database is lost without it.
#   database-url      BASTION_DATABASE_URL with the password, uid 10001
#   redis-url         BASTION_REDIS_URL with the password, uid 10001
#   ray-token         Ray's token (RAY_AUTH_TOKEN_PATH), uid 10001: gateways, Ray nodes
#   ray-ca.crt        the Ray CA's certificate, uid 10001 (public)
#   ray-ca.key        the Ray CA's key, uid 10001: gateways and Ray nodes issue their own
#                     Ray certificates with it at start (ray-node-cert.sh)
#   postgres-password PostgreSQL's password (POSTGRES_PASSWORD_FILE), uid 999 (postgres)
#   redis.conf        Redis's configuration with `requirepass`, uid 999 (redis)
#
# Existing files are kept: delete one to make it anew (and know what depends on it: a new
# master key makes every sealed secret in the database unreadable).
set -eu

BASTION_UID=${BASTION_UID:-10001}
POSTGRES_UID=${POSTGRES_UID:-999}
REDIS_UID=${REDIS_UID:-999}
dir=$(cd "$(dirname "$0")" && pwd)/secrets
umask 077
mkdir -p "$dir"
cd "$dir"

# A random string of URL-safe characters (no character a URL would need to escape).
random() { openssl rand -base64 48 | tr -dc 'A-Za-z0-9' | head -c "$1"; }

# write NAME UID CONTENT: a new file, readable by that uid only.
write() {
  if [ -e "$1" ]; then
    echo "kept    secrets/$1"
    return
  fi
  printf '%s\n' "$3" > "$1"
  chown "$2:$2" "$1"
  chmod 0400 "$1"
  echo "created secrets/$1"
}

if [ ! -e master.key ]; then
  write master.key "$BASTION_UID" "$(printf 'bastion-master-key-v1\n%s' "$(openssl rand -base64 32)")"
  chmod 0600 master.key
else
  echo "kept    secrets/master.key"
fi

if [ ! -e postgres-password ]; then
  pg_password=$(random 40)
  write postgres-password "$POSTGRES_UID" "$pg_password"
  write database-url "$BASTION_UID" "postgresql+psycopg://bastion:${pg_password}@postgres:5432/bastion"
else
  echo "kept    secrets/postgres-password (and database-url)"
fi

if [ ! -e redis.conf ]; then
  redis_password=$(random 40)
  write redis.conf "$REDIS_UID" "$(printf '# Written by make-secrets.sh.\nrequirepass %s\nappendonly yes\nprotected-mode yes' "$redis_password")"
  write redis-url "$BASTION_UID" "redis://:${redis_password}@redis:6379/0"
else
  echo "kept    secrets/redis.conf (and redis-url)"
fi

write ray-token "$BASTION_UID" "$(random 48)"

if [ ! -e ray-ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=Bastion Ray CA" -keyout ray-ca.key -out ray-ca.crt \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign"
  chown "$BASTION_UID:$BASTION_UID" ray-ca.key ray-ca.crt
  chmod 0400 ray-ca.key
  chmod 0444 ray-ca.crt
  echo "created secrets/ray-ca.key, secrets/ray-ca.crt"
else
  echo "kept    secrets/ray-ca.key"
fi

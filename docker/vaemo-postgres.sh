#!/bin/sh
# The command of vaemo-base:postgres (Debian's PostgreSQL 15), standing in for the postgres:16 image in
# compose.offline.yaml: the first start creates the cluster with POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB.
set -eu
PATH=/usr/lib/postgresql/15/bin:$PATH
PGDATA=/var/lib/postgresql/data
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/password
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/password --auth-local=trust --auth-host=scram-sha-256
  rm /tmp/password
  echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 -c port="${POSTGRES_PORT:-5432}" -c unix_socket_directories=/tmp

#!/bin/bash
# Prints a DATABASE_URL for the embedded PostgreSQL cluster, creating and starting it when needed.
# The cluster lives in the state folder (kept between runs) and listens on a unix socket only, in a
# folder that only its owner and root can enter.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
database=sandbox_gateway

pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
if [[ ! -x $pg_bin/initdb ]]; then
    apt_install postgresql
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
fi
id -u postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
as_postgres() { runuser -u postgres -- "$@"; }

# initdb and pg_ctl refuse to run as root, and the postgres user must be able to reach the folder.
# A clone under a private folder (mktemp -d) is out of its reach: fall back to a folder per clone
# under /var/lib.
pg_dir=$STATE_DIR/postgres
mkdir -p "$pg_dir"
chown postgres: "$pg_dir"
chmod 700 "$pg_dir"
if ! as_postgres test -w "$pg_dir"; then
    pg_dir=/var/lib/sandbox-gateway/postgres-$(echo "$ROOT" | sha256sum | cut -c1-12)
    mkdir -p "$pg_dir"
    chown postgres: "$pg_dir"
    chmod 700 "$pg_dir"
fi
data=$pg_dir/data
socket_dir=$pg_dir/run
# A unix socket path must fit in 107 bytes.
if ((${#socket_dir} > 80)); then
    socket_dir=/run/sandbox-gateway-pg-$(echo "$pg_dir" | sha256sum | cut -c1-12)
fi
mkdir -p "$socket_dir"
chown postgres: "$socket_dir"
chmod 700 "$socket_dir"

if [[ ! -f $data/PG_VERSION ]]; then
    say "creating the embedded PostgreSQL cluster in $data"
    as_postgres "$pg_bin/initdb" --no-sync -A trust -U postgres -E UTF8 -D "$data" >/dev/null
fi
if ! as_postgres "$pg_bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    say "starting PostgreSQL (log: $pg_dir/postgres.log)"
    as_postgres "$pg_bin/pg_ctl" -D "$data" -l "$pg_dir/postgres.log" -w -t 60 \
        -o "-c listen_addresses='' -c unix_socket_directories='$socket_dir'" start >/dev/null
fi
if ! as_postgres "$pg_bin/psql" -h "$socket_dir" -U postgres -Atqc \
    "SELECT 1 FROM pg_database WHERE datname = '$database'" postgres | grep -q 1; then
    as_postgres "$pg_bin/createdb" -h "$socket_dir" -U postgres "$database"
fi
echo "postgresql://postgres@/$database?host=$socket_dir"

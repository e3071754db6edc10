#!/bin/bash
# PID 1 of the postgres service, on either base: creates the cluster on first start (the superuser's
# password from POSTGRES_PASSWORD, the gateway's database), then runs PostgreSQL on a unix socket only,
# in the volume it shares with the gateway. Arguments go to postgres (e.g. -c shared_buffers=256MB).
set -euo pipefail
socket_dir=/run/postgresql
database=${POSTGRES_DB:-sandbox_gateway}

if [[ $(id -u) == 0 ]]; then
    # Volumes may come up owned by root (a bind mount, an older volume): make them the server's.
    chown postgres:postgres "$PGDATA" "$socket_dir"
    chmod 700 "$PGDATA"
    # Others may enter to reach the socket; only the gateway's container mounts this volume.
    chmod 755 "$socket_dir"
    exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$0" "$@"
fi

if [[ ! -s $PGDATA/PG_VERSION ]]; then
    if [[ -z ${POSTGRES_PASSWORD:-} ]]; then
        echo "POSTGRES_PASSWORD is required to create the database" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    # Password authentication even on the socket: the gateway's uid means nothing in this container.
    initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "CREATE DATABASE \"$database\"" | postgres --single -D "$PGDATA" postgres >/dev/null
    echo "created the cluster and the database $database in $PGDATA"
fi
exec postgres -D "$PGDATA" -c listen_addresses='' -c unix_socket_directories="$socket_dir" "$@"

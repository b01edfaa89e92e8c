#!/bin/sh
# First start: initdb, then the user and database from POSTGRES_USER/PASSWORD/DB. Then run
# postgres with the arguments given (e.g. -c listen_addresses=127.0.0.1 -p 5432).
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # UTF8 as the official image does (the default here would be SQL_ASCII: no locale).
  initdb -D "$PGDATA" -E UTF8 --locale=C.UTF-8 --auth-host=scram-sha-256 --auth-local=trust \
    -U postgres >/dev/null
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start >/dev/null
  psql -h /tmp -U postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE ROLE \"${POSTGRES_USER}\" LOGIN PASSWORD '${POSTGRES_PASSWORD}'" \
    -c "CREATE DATABASE \"${POSTGRES_DB}\" OWNER \"${POSTGRES_USER}\""
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -k /tmp "$@"

#!/usr/bin/env bash
# Start a throw-away PostgreSQL for the registry test on another database (Debian's postgresql).
# Prints the SQLAlchemy URL on success; prints nothing (and the test is skipped) when it cannot.
set -uo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2 || exit 0
fi
read -r version cluster _ < <(pg_lsclusters --no-header | head -1) || exit 0
[ -n "${version:-}" ] || exit 0
pg_ctlcluster "$version" "$cluster" start >&2 2>/dev/null || true
for _ in $(seq 1 30); do
    su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
    sleep 1
done
# a role for the user running the tests (peer authentication over the Unix socket), owning the test database
user="$(id -un)"
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname = '$user'\"" | grep -q 1 \
    || su postgres -c "createuser --superuser '$user'" >/dev/null 2>&1 || exit 0
su postgres -c "psql -qtAc 'drop database if exists imagegen_test'" >/dev/null 2>&1 || exit 0
su postgres -c "createdb --owner '$user' imagegen_test" >/dev/null 2>&1 || exit 0
echo "postgresql+psycopg://$user@/imagegen_test?host=/var/run/postgresql"

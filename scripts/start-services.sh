#!/usr/bin/env bash
# Starts the PostgreSQL and Redis servers the integration tests use, if they are not up.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v redis-server >/dev/null 2>&1; then
  echo "installing postgresql and redis-server from Debian packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null
fi

if ! pg_up; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
fi
if ! redis_up; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
for _ in $(seq 1 30); do
  if pg_up && redis_up; then break; fi
  sleep 1
done
pg_up || { echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1; }
redis_up || { echo "Redis did not come up on 127.0.0.1:6379" >&2; exit 1; }
# The tests use the database `test` with trust auth (as this kind of machine is set up).
if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
  su postgres -c "createdb test" 2>/dev/null || psql -h 127.0.0.1 -U postgres -c 'create database test' || true
fi
echo "services: PostgreSQL and Redis are up"

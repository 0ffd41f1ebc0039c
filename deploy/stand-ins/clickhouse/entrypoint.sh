#!/bin/sh
# The official image's start, for Debian's clickhouse-server: the user from
# CLICKHOUSE_USER / CLICKHOUSE_PASSWORD replaces `default` (from any
# address), CLICKHOUSE_DB is created on the first start, and the server runs
# in the foreground as user `clickhouse`.
set -eu
config=/etc/clickhouse-server/config.xml
user="${CLICKHOUSE_USER:-default}"
password="${CLICKHOUSE_PASSWORD:-}"
chown -R clickhouse:clickhouse /var/lib/clickhouse /var/log/clickhouse-server
if [ "$user" != default ]; then remove='<default remove="remove"/>'; else remove=''; fi
cat > /etc/clickhouse-server/users.d/container-user.xml <<XML
<?xml version="1.0"?>
<yandex>
    <users>
        $remove
        <$user>
            <password>$password</password>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </$user>
    </users>
</yandex>
XML
run() { setpriv --reuid=clickhouse --regid=clickhouse --init-groups "$@"; }
if [ -n "${CLICKHOUSE_DB:-}" ] && [ ! -e "/var/lib/clickhouse/metadata/${CLICKHOUSE_DB}.sql" ]; then
  run clickhouse-server --config-file="$config" >/dev/null 2>&1 &
  pid=$!
  tries=0
  until clickhouse-client --user "$user" --password "$password" --query 'SELECT 1' >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ] || ! kill -0 "$pid" 2>/dev/null; then
      echo "clickhouse-entrypoint: the server did not answer within 30 s to create database ${CLICKHOUSE_DB}" >&2
      exit 1
    fi
    sleep 0.5
  done
  clickhouse-client --user "$user" --password "$password" --query "CREATE DATABASE IF NOT EXISTS ${CLICKHOUSE_DB}"
  kill "$pid"
  wait "$pid" || true
fi
exec setpriv --reuid=clickhouse --regid=clickhouse --init-groups clickhouse-server --config-file="$config" "$@"

#!/bin/bash
# Measures the append protocols of docs/postgres.md on a throwaway PostgreSQL 15 cluster.
set -euo pipefail
# Usage (as root, which starts PostgreSQL as the postgres user): docs/bench/postgres-append/run.sh
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=/usr/lib/postgresql/15/bin
D=/tmp/pgm/data; S=/tmp/pgm/sock
rm -rf $D $S; mkdir -p $S; cp "$HERE"/*.sql /tmp/pgm/; chown -R postgres /tmp/pgm
su postgres -c "$BIN/initdb -D $D -A trust >/dev/null"
su postgres -c "$BIN/pg_ctl -D $D -o \"-k $S -c listen_addresses='' -c synchronous_commit=on -c max_connections=200 -c shared_buffers=512MB\" -l $D/log start >/dev/null"
P="$BIN/psql -h $S -U postgres -q"
su postgres -c "$P -f /tmp/pgm/setup.sql postgres"
run() { # name script clients seconds
  su postgres -c "$BIN/pgbench -h $S -U postgres -n -f /tmp/pgm/$2 -c $3 -j 2 -T $4 postgres" 2>&1 | grep -E "^(tps|latency average|number of transactions actually)"
}
echo "== pg_test_fsync (fdatasync, 8 kB) =="
$BIN/pg_test_fsync -f $D/fsync_test -s 3 2>&1 | grep -E "fdatasync" | head -2
for round in 1 2; do
  echo "== round $round =="
  echo "-- plain bigserial, 64 clients, 1 event/txn"; run plain plain.sql 64 10
  echo "-- head row, 64 clients, 1 event/txn"; run head1 head1.sql 64 10
  echo "-- advisory lock, 64 clients, 1 event/txn"; run adv1 adv1.sql 64 10
  echo "-- head row, 1 client, 64 events/txn (a node's group commit)"; run head64 head64.sql 1 10
  echo "-- head row, 3 clients, 64 events/txn (three nodes)"; run head64 head64.sql 3 10
  echo "-- advisory lock, 3 clients, 64 events/txn"; run adv64 adv64.sql 3 10
  echo "-- set-based, 1 client, 64 events/txn"; run set64 set64.sql 1 10
  echo "-- set-based, 3 clients, 64 events/txn"; run set64 set64.sql 3 10
  echo "-- set-based, 1 client, 256 events/txn"; run set256 set256.sql 1 10
done
echo "== revisions dense per stream in every table =="
for t in events events2 events3; do
  su postgres -c "$P -t -c \"SELECT '$t', count(*) FROM (SELECT stream, max(revision) - min(revision) + 1 - count(*) AS holes, min(revision) AS first FROM $t GROUP BY stream) x WHERE holes <> 0 OR first <> 0\" postgres"
done
su postgres -c "$BIN/pg_ctl -D $D stop -m fast >/dev/null"
rm -rf $D

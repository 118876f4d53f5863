#!/bin/bash
# Where an append call's time goes inside PostgreSQL: pg_stat_statements (track = all) and
# pg_stat_user_functions over one node, 64 writers. ALTER="..." runs a statement on the store
# first (such as ALTER FUNCTION skald.append RESET plan_cache_mode).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SKALD=$(cd "$HERE/../../.." && pwd)/target/release/skald
SECS=${1:-10}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
W=$(mktemp -d /tmp/skald-pss.XXXXXX); D=$W/data; S=$W/sock; mkdir -p "$S"; chown -R postgres "$W"
NODE=""
cleanup() { [ -n "$NODE" ] && kill $NODE 2>/dev/null || true; su postgres -c "$BIN/pg_ctl -D $D stop -m fast >/dev/null" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
su postgres -c "$BIN/initdb -D $D -A trust >/dev/null"
su postgres -c "$BIN/pg_ctl -D $D -o \"-k $S -c listen_addresses='' -c synchronous_commit=on -c max_connections=200 -c shared_buffers=512MB -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all -c pg_stat_statements.track_planning=on -c track_functions=pl\" -l $D/log start >/dev/null"
P="$BIN/psql -h $S -U postgres -q"
URL="postgres://postgres@${S//\//%2F}"
su postgres -c "$P -c 'CREATE DATABASE one' postgres"
su postgres -c "$P -c 'CREATE EXTENSION pg_stat_statements' one"
out=$W/node
"$SKALD" serve --store "$URL/one" --data-dir $W/n --listen 127.0.0.1:0 > "$out" 2>"$out.err" & NODE=$!
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
n=$(grep -o 'http://[0-9.:]*' "$out")
[ -n "${ALTER:-}" ] && su postgres -c "$P -c \"$ALTER\" one"
"$SKALD" bench append --server $n --writers 64 --duration 3 > /dev/null
su postgres -c "$P -c 'SELECT pg_stat_statements_reset()' one" >/dev/null
su postgres -c "$P -c 'SELECT pg_stat_reset()' one" >/dev/null
"$SKALD" bench append --server $n --writers 64 --duration $SECS | grep -i "events/s" | head -2
su postgres -c "$P -c \"SELECT calls, round(total_exec_time) exec_ms, round(total_plan_time) plan_ms, round((total_exec_time+total_plan_time)/greatest(calls,1)*1000) us_per_call, plans, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 90) q FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 14\" one"
su postgres -c "$P -c 'SELECT funcname, calls, round(total_time) total_ms, round(self_time) self_ms FROM pg_stat_user_functions' one"

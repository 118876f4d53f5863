#!/bin/bash
# Measures Skald nodes on PostgreSQL (issue 24's benchmarks) and PostgreSQL's own baseline in
# the same run, on a throwaway PostgreSQL 15 cluster (synchronous_commit = on).
# Usage (as root, which starts PostgreSQL as the postgres user):
#   cargo build --release --bin skald && docs/bench/postgres-node/run.sh [SECONDS] [ROUNDS]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SKALD=$(cd "$HERE/../../.." && pwd)/target/release/skald
SECS=${1:-10}
ROUNDS=${2:-2}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
W=$(mktemp -d /tmp/skald-pgnode.XXXXXX)
D=$W/data
S=$W/sock
mkdir -p "$S"
chown -R postgres "$W"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  su postgres -c "$BIN/pg_ctl -D $D stop -m fast >/dev/null" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
su postgres -c "$BIN/initdb -D $D -A trust >/dev/null"
su postgres -c "$BIN/pg_ctl -D $D -o \"-k $S -c listen_addresses='' -c synchronous_commit=on -c max_connections=200 -c shared_buffers=512MB\" -l $D/log start >/dev/null"
P="$BIN/psql -h $S -U postgres -q"
su postgres -c "$P -c 'CREATE DATABASE baseline' postgres"
su postgres -c "$P -c 'CREATE TABLE plain (position bigserial PRIMARY KEY, stream text NOT NULL, data bytea NOT NULL); CREATE INDEX plain_stream ON plain (stream, position)' baseline"
cp "$HERE/../postgres-append/plain.sql" "$W/plain.sql"
chown postgres "$W/plain.sql"
URL="postgres://postgres@${S//\//%2F}"

# Starts a node on database $1 in data directory $2; prints its URL.
start_node() {
  local out=$W/node.$RANDOM
  "$SKALD" serve --store "$URL/$1" --data-dir "$2" --listen 127.0.0.1:0 > "$out" 2>"$out.err" &
  PIDS+=($!)
  for _ in $(seq 100); do
    if grep -q listening "$out"; then grep -o 'http://[0-9.:]*' "$out"; return; fi
    sleep 0.1
  done
  cat "$out.err" >&2; exit 1
}
stop_nodes() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}
summary() { # JSON reports on stdin, one per line of files
  python3 -c '
import json, sys
reports = [json.load(open(f)) for f in sys.argv[1:]]
events = sum(r["append"]["events_per_sec"] for r in reports)
p50 = max(r["append"]["latency"]["p50_us"] for r in reports) / 1000
p99 = max(r["append"]["latency"]["p99_us"] for r in reports) / 1000
errors = sum(r["append"]["errors"] for r in reports)
print(f"{events:,.0f} events/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms (worst node), errors {errors}")
' "$@"
}

echo "== fdatasync of this disk (pg_test_fsync, 8 kB) =="
"$BIN/pg_test_fsync" -f "$D/fsync_test" -s 3 2>&1 | grep -E "^ +fdatasync" | head -1
for round in $(seq "$ROUNDS"); do
  echo "== round $round =="
  echo -n "baseline: PostgreSQL, 64 clients, one 256-byte row per transaction into a bigserial table: "
  su postgres -c "$BIN/pgbench -h $S -U postgres -n -f $W/plain.sql -c 64 -j 2 -T $SECS baseline" 2>&1 \
    | grep -E "^tps" | sed 's/ (without initial connection time)//'
  db=one$round
  su postgres -c "$P -c 'CREATE DATABASE $db' postgres"
  node=$(start_node "$db" "$W/n-$db")
  echo -n "one node, 64 writers, one 256-byte event per append, 10,000 streams: "
  "$SKALD" bench append --server "$node" --writers 64 --duration "$SECS" --json > "$W/one.json"
  summary "$W/one.json"
  echo -n "catch-up read of the global log over HTTP NDJSON: "
  "$SKALD" bench read --server "$node" --events 1000000 --json > "$W/read.json"
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["read"]
print("{:,.0f} events/s ({:,} events)".format(r["events_per_sec"], r["events"]))
' "$W/read.json"
  stop_nodes
  db=three$round
  su postgres -c "$P -c 'CREATE DATABASE $db' postgres"
  nodes=()
  for i in 1 2 3; do nodes+=("$(start_node "$db" "$W/n-$db-$i")"); done
  echo -n "three nodes, 64 writers in all (22, 21, 21), one event per append: "
  bench=()
  for i in 0 1 2; do
    writers=$((i == 0 ? 22 : 21))
    "$SKALD" bench append --server "${nodes[$i]}" --writers $writers --duration "$SECS" --json > "$W/three$i.json" &
    bench+=($!)
  done
  for b in "${bench[@]}"; do wait "$b"; done
  summary "$W/three0.json" "$W/three1.json" "$W/three2.json"
  echo -n "append on node 1, delivery on node 2 (100 subscribers on 10 streams, 1,000 events/s): "
  "$SKALD" bench subscribe --server "${nodes[1]}" --append-server "${nodes[0]}" --sse 50 --ws 50 \
    --subscribe-streams 10 --rate 1000 --duration "$SECS" --events 1000 --json > "$W/sub.json" 2>/dev/null
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1])); l = r["latency"]
print("p50 {:.2f} ms, p99 {:.2f} ms, max {:.2f} ms; {:,} of {:,} deliveries".format(
    l["p50_us"] / 1000, l["p99_us"] / 1000, l["max_us"] / 1000, r["deliveries"], r["deliveries_expected"]))
' "$W/sub.json"
  stop_nodes
done

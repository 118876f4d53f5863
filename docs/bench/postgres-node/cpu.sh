#!/bin/bash
# Where the CPU goes: one node vs three nodes on one PostgreSQL, 64 writers in all.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SKALD=$(cd "$HERE/../../.." && pwd)/target/release/skald
SECS=${1:-10}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
W=$(mktemp -d /tmp/skald-cpu.XXXXXX); D=$W/data; S=$W/sock; mkdir -p "$S"; chown -R postgres "$W"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  su postgres -c "$BIN/pg_ctl -D $D stop -m fast >/dev/null" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
su postgres -c "$BIN/initdb -D $D -A trust >/dev/null"
su postgres -c "$BIN/pg_ctl -D $D -o \"-k $S -c listen_addresses='' -c synchronous_commit=on -c max_connections=200 -c shared_buffers=512MB\" -l $D/log start >/dev/null"
P="$BIN/psql -h $S -U postgres -q"
URL="postgres://postgres@${S//\//%2F}"
start_node() { local out=$W/node.$RANDOM
  "$SKALD" serve --store "$URL/$1" --data-dir "$2" --listen 127.0.0.1:0 ${NODE_ARGS:-} > "$out" 2>"$out.err" &
  PIDS+=($!); for _ in $(seq 100); do if grep -q listening "$out"; then grep -o 'http://[0-9.:]*' "$out"; return; fi; sleep 0.1; done; cat "$out.err" >&2; exit 1; }
stop_nodes() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }
ticks() { # total utime+stime of processes matching $1 (pgrep -f pattern)
  local t=0; for p in $(pgrep -f "$1" || true); do
    if [ -r /proc/$p/stat ]; then set -- $(sed 's/.*) //' /proc/$p/stat); t=$((t + ${12} + ${13})); fi; done; echo $t; }
idle() { awk '/^cpu /{print $5+$6}' /proc/stat; }
measure() { # label, then bench commands run in background
  local label=$1; shift
  local pg0=$(ticks "postgres") sk0=$(ticks "skald serve") id0=$(idle) t0=$(date +%s.%N)
  local bench=() i=0
  for cmd in "$@"; do eval "$cmd > $W/r$i.json" & bench+=($!); i=$((i+1)); done
  local bt=0
  for b in "${bench[@]}"; do wait "$b"; done
  local pg1=$(ticks "postgres") sk1=$(ticks "skald serve") id1=$(idle) t1=$(date +%s.%N)
  python3 - "$label" "$pg0" "$pg1" "$sk0" "$sk1" "$id0" "$id1" "$t0" "$t1" $W/r*.json <<'PY'
import json, sys
label, pg0, pg1, sk0, sk1, id0, id1, t0, t1 = sys.argv[1:10]
files = sys.argv[10:]
el = float(t1) - float(t0); hz = 100
ev = sum(json.load(open(f))["append"]["events_per_sec"] for f in files)
p99 = max(json.load(open(f))["append"]["latency"]["p99_us"] for f in files) / 1000
pg = (int(pg1) - int(pg0)) / hz / el; sk = (int(sk1) - int(sk0)) / hz / el
idle = (int(id1) - int(id0)) / hz / el
print(f"{label}: {ev:,.0f} events/s p99 {p99:.1f} ms | CPU cores: postgres {pg:.2f}, skald nodes {sk:.2f}, idle+iowait {idle:.2f} (rest: load generators)")
PY
  rm -f $W/r*.json; }
for round in 1 2; do
  # NODE_ARGS="--durability none" measures without the commit flush
  su postgres -c "$P -c 'CREATE DATABASE one$round' postgres"
  n=$(start_node one$round $W/one$round)
  measure "one node, one generator of 64" "$SKALD bench append --server $n --writers 64 --duration $SECS --json"
  measure "one node, three generators 22/21/21" "$SKALD bench append --server $n --writers 22 --duration $SECS --json" "$SKALD bench append --server $n --writers 21 --duration $SECS --json" "$SKALD bench append --server $n --writers 21 --duration $SECS --json"
  stop_nodes
  su postgres -c "$P -c 'CREATE DATABASE three$round' postgres"
  a=$(start_node three$round $W/t$round-1); b=$(start_node three$round $W/t$round-2); c=$(start_node three$round $W/t$round-3)
  measure "three nodes, generators 22/21/21" "$SKALD bench append --server $a --writers 22 --duration $SECS --json" "$SKALD bench append --server $b --writers 21 --duration $SECS --json" "$SKALD bench append --server $c --writers 21 --duration $SECS --json"
  measure "three nodes up, load on one (64)" "$SKALD bench append --server $a --writers 64 --duration $SECS --json"
  stop_nodes
done

#!/usr/bin/env bash
# Property-based testing of the HTTP API from its OpenAPI document (schemathesis, from PyPI):
# no 5xx answer and no response that breaks its schema, with authentication on and an admin
# key. Usage: tests/security/schemathesis.sh PATH/TO/skald [MAX_EXAMPLES]
set -euo pipefail
skald=$1
examples=${2:-10}
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=$root/target/schemathesis
if [ ! -x "$venv/bin/st" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==4.32.5"
fi
work=$(mktemp -d)
cat > "$work/skald.toml" <<TOML
[auth]
api_keys = true
TOML
"$skald" serve --data-dir "$work/data" --listen 127.0.0.1:0 --config "$work/skald.toml" \
    > "$work/stdout" 2> "$work/stderr" &
pid=$!
# Stop only the server this script started, by its id.
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
    grep -q "listening on" "$work/stdout" 2>/dev/null && break
    sleep 0.1
done
url=$(grep -o 'http://[0-9.:]*' "$work/stdout" | head -1)
if [ -z "$url" ]; then
    echo "skald did not start:" >&2
    cat "$work/stderr" >&2
    exit 1
fi
key=$(cat "$work/data/initial-admin-key")
cd "$work"
"$venv/bin/st" run "$url/v1/openapi.json" --url "$url" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "$examples" --request-timeout 10 --seed 1 --no-color \
    -H "Authorization: Bearer $key"

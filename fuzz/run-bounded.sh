#!/usr/bin/env bash
# A short, bounded run of every fuzz target, as CI does: any crash fails. cargo-fuzz works on
# stable Rust with `-s none` (coverage instrumentation without a sanitizer).
# Usage: fuzz/run-bounded.sh [SECONDS_PER_TARGET]
set -euo pipefail
seconds=${1:-30}
cd "$(dirname "$0")"
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -s none
for target in $(cargo fuzz list); do
    echo "fuzzing $target for ${seconds}s"
    log=$(mktemp)
    status=0
    # Hand-written seeds (hostile shapes found by reviews) join the generated corpus.
    corpora=("corpus/$target")
    mkdir -p "corpus/$target"
    if [ -d "seeds/$target" ]; then
        corpora+=("seeds/$target")
    fi
    cargo fuzz run -s none "$target" "${corpora[@]}" -- -max_total_time="$seconds" \
        -print_final_stats=1 -rss_limit_mb=1024 > "$log" 2>&1 || status=$?
    # libFuzzer's progress lines are left out; its summary and any crash are shown.
    grep -E "^(Done|stat::number_of_executed_units)|panicked|ERROR|SUMMARY|deadly" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz target $target failed (exit $status); the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    rm -f "$log"
done

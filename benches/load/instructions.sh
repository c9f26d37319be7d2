#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: stable on a busy machine, where
# wall-clock benchmarks are not. Compares Meridian builds; prints the top functions.
#
# Usage: benches/load/instructions.sh [MERIDIAN_BINARY...]   (default target/release/meridian)
# Needs valgrind and h2load (apt-get install -y valgrind nghttp2-client). REQUESTS=5000.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REQUESTS=${REQUESTS:-5000}
XFF=${XFF:-81.2.69.142}
RUN=$(mktemp -d /tmp/meridian-ir.XXXXXX)
STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
    local i
    for i in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing on port $1" >&2
    exit 1
}

load() {
    h2load --h1 -n "$1" -c 10 -t 1 -H "X-Forwarded-For: $XFF" http://127.0.0.1:18081/v1/models |
        grep -E '^requests:' >&2
}

"${FAST_UPSTREAM:-$ROOT/target/release/examples/fast_upstream}" 127.0.0.1:18080 2>"$RUN/upstream.log" &
STARTED+=($!)
wait_port 18080
sed "s/^worker_threads = .*/worker_threads = 1/" "$ROOT/benches/load/meridian.toml" >"$RUN/meridian.toml"

[ $# -eq 0 ] && set -- "$ROOT/target/release/meridian"
for bin in "$@"; do
    out=$RUN/callgrind.$(basename "$bin").out
    valgrind_log=$RUN/valgrind.$(basename "$bin").log
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run -c "$RUN/meridian.toml" \
        2>"$valgrind_log" &
    pid=$!
    STARTED+=($pid)
    wait_port 18081
    load 500 # connections, pools and lazy statics: not part of the steady state
    callgrind_control -z "$pid" >/dev/null
    load "$REQUESTS"
    callgrind_control -d "$pid" >/dev/null
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    dump=$(ls -t "$out"* | grep -v "^$out$" | head -1)
    total=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
    [ -n "$total" ] || total=$(grep -m1 '^totals:' "$dump" | awk '{print $2}')
    echo "$(basename "$bin"): $((total / REQUESTS)) instructions per request ($REQUESTS requests, 10 connections)"
    callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | sed -n '1,/^-- Auto/p' | grep -E '^ *[0-9,]+ ' |
        head -"${TOP:-25}" | sed 's/^/    /' || true # head closes the pipe early
done

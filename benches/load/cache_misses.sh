#!/usr/bin/env bash
# Simulated cache misses per proxied request (valgrind's cachegrind), Meridian beside NGINX:
# this VM has no hardware counters, and the misses are what grows from 50 to 256 connections.
#
# Usage: benches/load/cache_misses.sh [MERIDIAN_BINARY]   (default target/release/meridian)
# Needs valgrind and h2load; NGINX is counted when it is on PATH. CONNS="10 256",
# LL=1048576,16,64 (the last level simulated: this host's L2 per core; the L3 behind it is
# not modelled, so an LL miss here is an L2 miss), PROXIES="meridian nginx".
# Cachegrind cannot leave out start-up and warm-up, so each count runs twice, with 5,000 and
# with 25,000 requests, and the difference is divided by 20,000: the marginal request.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$ROOT/target/release/meridian}
EXAMPLES=${EXAMPLES:-$(dirname "$BIN")/examples}
[ -x "$EXAMPLES/fast_upstream" ] || EXAMPLES=$ROOT/target/release/examples
CONNS=${CONNS:-"10 256"}
LL=${LL:-1048576,16,64}
PROXIES=${PROXIES:-"meridian nginx"}
RUN=$(mktemp -d /tmp/meridian-cache.XXXXXX)
STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT

# shellcheck source=benches/load/valgrind_common.sh
. "$ROOT/benches/load/valgrind_common.sh"
ports_free 18080 18081 18082 18089 18091
start_upstream
write_configs

# measure NAME CONNS REQUESTS: one run under cachegrind; leaves its summary line in $RUN.
measure() {
    local name=$1 conns=$2 requests=$3 port pid
    local out=$RUN/$name-$conns-$requests.out
    local sim=(valgrind --tool=cachegrind --cache-sim=yes "--LL=$LL" "--cachegrind-out-file=$out")
    case $name in
    nginx)
        port=18082
        "${sim[@]}" nginx -p "$RUN/nginx/" -c nginx.conf -g 'daemon off; master_process off;' \
            2>"$RUN/$name.log" &
        ;;
    *)
        port=18081
        RUST_LOG=warn "${sim[@]}" "$BIN" run -c "$RUN/meridian.toml" 2>"$RUN/$name.log" &
        ;;
    esac
    pid=$!
    STARTED+=($pid)
    wait_port "$port"
    h2load --h1 -n "$requests" -c "$conns" -t 1 -H "X-Forwarded-For: 81.2.69.142" \
        "http://127.0.0.1:$port/v1/models" | grep -E '^requests:' >&2
    # A graceful stop: cachegrind writes its counts at exit.
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    grep '^summary:' "$out" >"$RUN/$name-$conns-$requests.summary"
}

printf '%-10s %6s %9s %9s %9s %9s %9s\n' proxy conns Ir I1mr D1mr D1mw 'LL miss'
for name in $PROXIES; do
    [ "$name" = nginx ] && ! command -v nginx >/dev/null 2>&1 && continue
    for conns in $CONNS; do
        measure "$name" "$conns" 5000
        measure "$name" "$conns" 25000
        # summary: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw
        paste "$RUN/$name-$conns-5000.summary" "$RUN/$name-$conns-25000.summary" | awk -v n="$name" -v c="$conns" '{
            for (i = 2; i <= 10; i++) d[i - 1] = ($(i + 10) - $i) / 20000
            printf "%-10s %6s %9.0f %9.0f %9.0f %9.0f %9.0f\n", n, c, d[1], d[2], d[5], d[8], d[3] + d[6] + d[9]
        }'
    done
done
echo "(per request: instructions, L1 instruction misses, L1 data read and write misses, last-level misses of all kinds)"

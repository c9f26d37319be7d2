#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: stable on a busy machine, where
# wall-clock benchmarks are not. Compares Meridian builds; prints the top functions.
#
# Usage: benches/load/instructions.sh [MERIDIAN_BINARY...]   (default target/release/meridian)
#        benches/load/instructions.sh --budget N [MERIDIAN_BINARY]
#   --budget: CI's regression guard: fails when a request costs more than N instructions
#   (no function list). Default binary for it: target/debug/meridian, the build CI has.
# Needs valgrind (apt-get install -y valgrind). Load comes from h2load when it is installed
# (report mode) or from examples/load_probe (always in --budget mode, so CI needs nothing
# else). REQUESTS=5000 (2000 with --budget), WARMUP=500 (300 with --budget), CONNS=10,
# CONFIG_SED, KEEP=1 (keep the callgrind dumps, e.g. for callgrind_annotate --tree=caller),
# SDK_HEADERS=1 (h2load only: the fields the openai Python SDK sends with each request),
# H2C=1 (h2load only: HTTP/2 with prior knowledge, 10 streams per connection, instead of
# HTTP/1.1), BODY=file (h2load only: POST the file's bytes as each request's body),
# NGINX=1 (report mode: count NGINX too, one worker with benches/load/nginx.conf, under the
# same load: the yardstick for the per-request figure), CALLGRIND_ARGS (more
# callgrind options, for Meridian and NGINX alike: --dump-instr=yes to find the call sites
# of memcpy, or --cache-sim=yes --D1=32768,8,64 --LL=1048576,8,64 to attribute the misses
# of a core's L1 and L2 to functions; cache_misses.sh counts the totals).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUDGET=""
if [ "${1:-}" = --budget ]; then
    BUDGET=${2:?--budget needs an instruction count}
    shift 2
    [ $# -eq 0 ] && set -- "$ROOT/target/debug/meridian"
fi
[ $# -eq 0 ] && set -- "$ROOT/target/release/meridian"
REQUESTS=${REQUESTS:-$([ -n "$BUDGET" ] && echo 2000 || echo 5000)}
WARMUP=${WARMUP:-$([ -n "$BUDGET" ] && echo 300 || echo 500)}
XFF=${XFF:-81.2.69.142}
HEADERS=(-H "X-Forwarded-For: $XFF")
if [ -n "${SDK_HEADERS:-}" ]; then
    # As openai-python 1.x sends them (its user agent, x-stainless-* platform fields).
    for h in "User-Agent: OpenAI/Python 1.109.1" "Accept: application/json" \
        "Content-Type: application/json" "Authorization: Bearer sk-test" \
        "X-Stainless-Lang: python" "X-Stainless-Package-Version: 1.109.1" "X-Stainless-OS: Linux" \
        "X-Stainless-Arch: x64" "X-Stainless-Runtime: CPython" "X-Stainless-Runtime-Version: 3.11.2" \
        "X-Stainless-Async: false" "X-Stainless-Retry-Count: 0" "X-Stainless-Read-Timeout: 600"; do
        HEADERS+=(-H "$h")
    done
fi
CONNS=${CONNS:-10}
EXAMPLES=${EXAMPLES:-$(dirname "$1")/examples}
RUN=$(mktemp -d /tmp/meridian-ir.XXXXXX)
STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "callgrind dumps kept in $RUN" >&2; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
# shellcheck source=benches/load/valgrind_common.sh
. "$ROOT/benches/load/valgrind_common.sh"

# load REQUESTS [PORT]: Meridian listens on 18081, NGINX on 18082 (h2c: 18089).
load() {
    local port=${2:-18081}
    if [ -z "$BUDGET" ] && command -v h2load >/dev/null 2>&1; then
        local mode=(--h1)
        if [ -n "${H2C:-}" ]; then
            mode=(-m 10)
            [ "$port" = 18082 ] && port=18089
        fi
        if [ -n "${BODY:-}" ]; then mode+=(-d "$BODY"); fi
        h2load "${mode[@]}" -n "$1" -c "$CONNS" -t 1 "${HEADERS[@]}" "http://127.0.0.1:$port/v1/models" |
            grep -E '^requests:' >&2
    else
        # The same request shape as compare.sh's wrk runs: GET /v1/models from a GB client.
        "$EXAMPLES/load_probe" keepalive "127.0.0.1:$port" "$CONNS" "$1" >&2
    fi
}

# count NAME PID OUT PORT: the instructions per request of the process PID runs under
# callgrind (dumping to OUT), after a warm-up; prints the top functions in report mode.
count() {
    local name=$1 pid=$2 out=$3 port=$4
    wait_port "$port"
    load "$WARMUP" "$port" # connections, pools and lazy statics: not part of the steady state
    callgrind_control -z "$pid" >/dev/null
    load "$REQUESTS" "$port"
    callgrind_control -d "$pid" >/dev/null
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local dump total per
    dump=$(ls -t "$out"* | grep -v "^$out$" | head -1)
    total=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
    [ -n "$total" ] || total=$(grep -m1 '^totals:' "$dump" | awk '{print $2}')
    per=$((total / REQUESTS))
    echo "$name: $per instructions per request ($REQUESTS requests, $CONNS connections)"
    if [ -n "$BUDGET" ]; then
        if [ "$per" -gt "$BUDGET" ]; then
            echo "over the budget of $BUDGET instructions per request (BENCHMARKS.md: what it guards)" >&2
            exit 1
        fi
        echo "within the budget of $BUDGET ($((per * 100 / BUDGET)) % of it)"
        return
    fi
    callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | sed -n '1,/^-- Auto/p' | grep -E '^ *[0-9,]+ ' |
        head -"${TOP:-25}" | sed 's/^/    /' || true # head closes the pipe early
}

ports_free 18080 18081 18091 ${NGINX:+18082 18089}
start_upstream
write_configs

for bin in "$@"; do
    out=$RUN/callgrind.$(basename "$bin").out
    valgrind_log=$RUN/valgrind.$(basename "$bin").log
    # shellcheck disable=SC2086 # CALLGRIND_ARGS is a list of options
    RUST_LOG=warn valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out" "$bin" run -c "$RUN/meridian.toml" \
        2>"$valgrind_log" &
    STARTED+=($!)
    count "$(basename "$bin")" "$!" "$out" 18081
done

if [ -n "${NGINX:-}" ] && [ -z "$BUDGET" ]; then
    out=$RUN/callgrind.nginx.out
    # shellcheck disable=SC2086 # CALLGRIND_ARGS is a list of options
    valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out" nginx -p "$RUN/nginx/" -c nginx.conf \
        -g 'daemon off; master_process off;' 2>"$RUN/valgrind.nginx.log" &
    STARTED+=($!)
    count nginx "$!" "$out" 18082
fi

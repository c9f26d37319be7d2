#!/usr/bin/env bash
# Side-by-side load benchmark: Meridian vs NGINX vs HAProxy in front of one fast local upstream.
#
# Installs nothing. Needs wrk; uses nginx, haproxy and h2load when they are on PATH.
#   apt-get install -y wrk nginx haproxy nghttp2-client
#
# Usage: benches/load/compare.sh [all|throughput|h2c|syscalls|sched|tls|burst|sse|streams|idle|mem|scale]...
#   (throughput runs h2c after it when h2load is installed, unless H2C=0)
# Knobs (environment): DURATION=10 (s per wrk run), ROUNDS=3, CONNS="50 256", WARMUP=2,
#   PROXIES="meridian nginx haproxy", PROXY_CPU=0, LOAD_CPU=1, IDLE_CONNS=10000,
#   MEM_SECONDS=60, SSE_PROBES=200, NO_BUILD=1 (reuse target/release), OUT=results dir,
#   MERIDIAN_BIN (default target/release/meridian), MERIDIAN_B=another build to compare
#   as proxy "meridian-b" (add it to PROXIES), e.g. one built with --no-default-features;
#   MERIDIAN_B_SED=a sed script applied to meridian-b's config (an older build may not
#   know newer keys, e.g. '/^\[upstream\]/,/^$/d'); MERIDIAN_ENV / MERIDIAN_B_ENV=extra
#   environment for each (e.g. MIMALLOC_PURGE_DELAY=-1);
#   TLS_CONNS=50 (tls phase); BURST_CLIENTS="3000 10000", BURST_HOLD=10, BURST_AFTER=30 (burst);
#   STREAMS="2000 9900", STREAM_EVENTS=40, STREAM_GAP_MS=250 (streams: concurrent SSE
#   streams; each holds a client and an upstream socket in the proxy, so with the usual
#   20,000 open-file limit 9,900 is the most that fits where 10,000 is meant; opening
#   9,900 took 10-15 s here, longer than 40 events last: run that count with
#   STREAM_EVENTS=120, and check "open mid" = N in the summary).
#
# All traffic goes to 127.0.0.1. Every run is bounded by DURATION; the whole default
# `all` takes about ROUNDS x proxies x |CONNS| x (DURATION + WARMUP + 2) s plus the probes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOAD=$ROOT/benches/load
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-"50 256"}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
MEM_SECONDS=${MEM_SECONDS:-60}
SSE_PROBES=${SSE_PROBES:-200}
WRK_THREADS=${WRK_THREADS:-1}
PATH_UNDER_TEST=${PATH_UNDER_TEST:-/v1/models}
# A GB client behind a trusted hop: Meridian does a real GeoIP lookup and residency routing.
XFF=${XFF:-81.2.69.142}

UPSTREAM=127.0.0.1:18080
declare -A PORT=([meridian]=18081 [nginx]=18082 [haproxy]=18083 [meridian-b]=18084 [direct]=18080)
# HTTPS listeners (tls phase): TLS 1.3 with an ECDSA P-256 certificate made per run.
declare -A TLS_PORT=([meridian]=18085 [nginx]=18086 [meridian-b]=18088)
TLS_CONNS=${TLS_CONNS:-50}
# NGINX's h2c (HTTP/2 prior knowledge) listener, for the h2load comparison.
H2C_NGINX_PORT=18089
BURST_CLIENTS=${BURST_CLIENTS:-"3000 10000"}
BURST_HOLD=${BURST_HOLD:-10}
BURST_AFTER=${BURST_AFTER:-30}
STREAMS=${STREAMS:-"2000 9900"}
STREAM_EVENTS=${STREAM_EVENTS:-40}
STREAM_GAP_MS=${STREAM_GAP_MS:-250}
# run_wrk's scheme and extra header (the tls phase sets them).
WRK_SCHEME=http
WRK_EXTRA=()
MERIDIAN_BIN=${MERIDIAN_BIN:-$ROOT/target/release/meridian}
BIN_DIR=${BIN_DIR:-$ROOT/target/release/examples}

RUN=$(mktemp -d /tmp/meridian-bench.XXXXXX)
OUT=${OUT:-$RUN}
mkdir -p "$OUT"
RESULTS=$OUT/runs.tsv
CLK_TCK=$(getconf CLK_TCK)
STARTED=()

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

have() { command -v "$1" >/dev/null 2>&1; }

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$port after 10 s"
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The process and its children (NGINX workers), so CPU and memory cover the whole proxy.
pids_of() {
    local root=$1
    echo "$root"
    pgrep -P "$root" 2>/dev/null || true
}

# utime + stime over the process tree, in clock ticks (fields 14 and 15 after the comm);
# `cpu_ticks PID user` counts utime alone (the user-space share of a run).
cpu_ticks() {
    local total=0 pid fields
    for pid in $(pids_of "$1"); do
        [ -r "/proc/$pid/stat" ] || continue
        fields=$(sed 's/^.*) //' "/proc/$pid/stat")
        if [ "${2:-}" = user ]; then
            total=$((total + $(echo "$fields" | awk '{print $12}')))
        else
            total=$((total + $(echo "$fields" | awk '{print $12 + $13}')))
        fi
    done
    echo "$total"
}

# A /proc/PID/status field (VmHWM, VmRSS) summed over the process tree, in KiB.
mem_kib() {
    local field=$1 total=0 pid v
    for pid in $(pids_of "$2"); do
        v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

upstream_accepted() {
    grep -o 'accepted: [0-9]*' "$RUN/upstream.log" 2>/dev/null | tail -1 | awk '{n = $2} END {print n + 0}'
}

build() {
    if [ -n "${NO_BUILD:-}" ]; then
        return
    fi
    log "building release binaries (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet --bin meridian --example fast_upstream --example load_probe)
}

declare -A PID=()

start_upstream() {
    port_free 18080 || die "port 18080 is taken"
    taskset -c "$LOAD_CPU" "$BIN_DIR/fast_upstream" "$UPSTREAM" 2>"$RUN/upstream.log" &
    STARTED+=($!)
    PID[direct]=$!
    wait_port 18080
}

# start_proxy NAME [WORKER_THREADS] [CPUS]
start_proxy() {
    local name=$1 threads=${2:-1} cpus=${3:-$PROXY_CPU} port=${PORT[$1]}
    port_free "$port" || die "port $port is taken"
    case $name in
    meridian | meridian-b)
        local bin=$MERIDIAN_BIN
        [ "$name" = meridian-b ] && bin=${MERIDIAN_B:?MERIDIAN_B names the second build}
        local tls_lines="" extra_env=${MERIDIAN_ENV:-}
        [ -f "$RUN/cert.pem" ] &&
            tls_lines="tls_listen = \"127.0.0.1:${TLS_PORT[$name]}\"\ntls_cert = \"$RUN/cert.pem\"\ntls_key = \"$RUN/key.pem\"\n"
        sed -e "s/^worker_threads = .*/worker_threads = $threads/" \
            -e "s/127.0.0.1:18081/127.0.0.1:$port/" -e "s/127.0.0.1:18091/127.0.0.1:$((port + 10))/" \
            -e "s|^\[server\]\$|[server]\n$tls_lines|" \
            "$LOAD/meridian.toml" >"$RUN/$name.toml"
        if [ "$name" = meridian-b ]; then
            extra_env=${MERIDIAN_B_ENV:-}
            [ -n "${MERIDIAN_B_SED:-}" ] && sed -i -e "$MERIDIAN_B_SED" "$RUN/$name.toml"
        fi
        # shellcheck disable=SC2086 # extra_env is a list of VAR=value words
        env RUST_LOG=warn $extra_env taskset -c "$cpus" "$bin" run -c "$RUN/$name.toml" 2>"$RUN/$name.log" &
        ;;
    nginx)
        mkdir -p "$RUN/nginx/tmp"
        cp "$LOAD/nginx.conf" "$RUN/nginx/nginx.conf"
        : >"$RUN/nginx/tls.conf"
        if [ -f "$RUN/cert.pem" ]; then
            cp "$RUN/cert.pem" "$RUN/key.pem" "$RUN/nginx/"
            sed "s/18086/${TLS_PORT[nginx]}/" "$LOAD/nginx-tls.conf" >"$RUN/nginx/tls.conf"
        fi
        taskset -c "$cpus" nginx -p "$RUN/nginx/" -c nginx.conf -g 'daemon off;' 2>"$RUN/nginx.log" &
        ;;
    haproxy)
        taskset -c "$cpus" haproxy -db -f "$LOAD/haproxy.cfg" 2>"$RUN/haproxy.log" &
        ;;
    *) die "unknown proxy $name" ;;
    esac
    STARTED+=($!)
    PID[$name]=$!
    wait_port "$port"
}

stop_proxy() {
    local name=$1
    kill "${PID[$name]}" 2>/dev/null || true
    wait "${PID[$name]}" 2>/dev/null || true
    unset "PID[$name]"
}

# wrk's latency figures in ms.
to_ms() {
    awk '{
        v = $1; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
        if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000
        printf "%.3f", v
    }'
}

# cpu_per_10k TICKS RPS: CPU-seconds per 10k requests of a DURATION-long run,
# ticks / CLK_TCK / (rps * DURATION) * 10000.
cpu_per_10k() {
    awk -v t="$1" -v hz="$CLK_TCK" -v r="$2" -v d="$DURATION" \
        'BEGIN { if (r > 0) printf "%.4f", t / hz / (r * d) * 10000; else print "nan" }'
}

# user_share USER_TICKS ALL_TICKS: the user-space share of the proxy's CPU, in % (the rest
# is the kernel's, on its behalf).
user_share() {
    awk -v u="$1" -v t="$2" 'BEGIN { if (t > 0) printf "%.0f", 100 * u / t; else print "nan" }'
}

# run_wrk NAME CONNS TAG: one measured wrk run against NAME, appended to $RESULTS.
run_wrk() {
    local name=$1 conns=$2 tag=$3 port=${PORT[$1]} url out t0 t1 u0 u1 c0 c1 rps p50 p99 cpu user hwm newconns
    [ "$WRK_SCHEME" = https ] && port=${TLS_PORT[$1]}
    url="$WRK_SCHEME://127.0.0.1:$port$PATH_UNDER_TEST"
    taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$conns" -d"${WARMUP}s" -H "X-Forwarded-For: $XFF" "${WRK_EXTRA[@]}" "$url" >/dev/null
    c0=$(upstream_accepted)
    t0=$(cpu_ticks "${PID[$name]}")
    u0=$(cpu_ticks "${PID[$name]}" user)
    out=$(taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$conns" -d"${DURATION}s" --latency \
        -H "X-Forwarded-For: $XFF" "${WRK_EXTRA[@]}" "$url")
    t1=$(cpu_ticks "${PID[$name]}")
    u1=$(cpu_ticks "${PID[$name]}" user)
    echo "$out" >"$RUN/wrk-$tag-$name-$conns-${round:-1}.txt"
    sleep 1.2 # the upstream reports its accept count once a second
    c1=$(upstream_accepted)
    rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}' | to_ms)
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}' | to_ms)
    local errors
    errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {printf "%s ", $0}')
    [ -n "$errors" ] && log "  $name c=$conns: $errors"
    cpu=$(cpu_per_10k $((t1 - t0)) "$rps")
    user=$(user_share $((u1 - u0)) $((t1 - t0)))
    hwm=$(mem_kib VmHWM "${PID[$name]}")
    newconns=$(( ${c1:-0} - ${c0:-0} ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" "$name" "$conns" "$rps" "$p50" "$p99" "$cpu" "$hwm" "$newconns" "$user" >>"$RESULTS"
    log "  $tag $name c=$conns: ${rps} req/s p50 ${p50} ms p99 ${p99} ms, ${cpu} CPU-s/10k (${user} % user), HWM ${hwm} KiB, +${newconns} upstream conns"
}

# Medians (with min-max) per proxy and connection count, plus ratios to NGINX.
summarise() {
    local tag=$1
    echo
    echo "== $tag: medians of $ROUNDS runs (min-max); wrk $DURATION s each, XFF $XFF =="
    [ "$tag" = h2c ] && echo "(h2load -c50 -m10: its mean and max time per request in the p50 and p99 columns)"
    awk -F'\t' -v tag="$tag" '
    function med(key,   n, i, j, t, a) {
        n = cnt[key]; for (i = 1; i <= n; i++) a[i] = val[key, i]
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        lo[key] = a[1]; hi[key] = a[n]
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function add(key, v) { cnt[key]++; val[key, cnt[key]] = v + 0 }
    $1 == tag {
        k = $2 SUBSEP $3; if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
        add(k SUBSEP "rps", $4); add(k SUBSEP "p50", $5); add(k SUBSEP "p99", $6)
        add(k SUBSEP "cpu", $7); add(k SUBSEP "hwm", $8); add(k SUBSEP "conn", $9)
        # µs of CPU per request in user space and in the kernel (CPU-s/10k x 100 = µs).
        if ($10 != "" && $10 != "nan") { add(k SUBSEP "usr", $7 * $10); add(k SUBSEP "sys", $7 * (100 - $10)) }
    }
    END {
        for (i = 1; i <= nk; i++) {
            k = order[i]
            for (m in metric) delete metric[m]
            split("rps p50 p99 cpu hwm conn", ms, " ")
            for (j in ms) { key = k SUBSEP ms[j]; M[k, ms[j]] = med(key); L[k, ms[j]] = lo[key]; H[k, ms[j]] = hi[key] }
        }
        printf "%-11s %5s %18s %20s %20s %24s %6s %9s %9s %9s %9s %9s\n", "proxy", "conns", "req/s", "p50 ms", "p99 ms", "CPU-s/10k req", "CPU %", "peak MiB", "new conns", "rps/NGINX", "req/CPU-s", "p99/NGINX"
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, kk, SUBSEP); name = kk[1]; c = kk[2]
            ng = "nginx" SUBSEP c
            rr = ((ng, "rps") in M && M[ng, "rps"] > 0) ? sprintf("%.2f", M[k, "rps"] / M[ng, "rps"]) : "-"
            cr = ((ng, "cpu") in M && M[k, "cpu"] > 0) ? sprintf("%.2f", M[ng, "cpu"] / M[k, "cpu"]) : "-"
            pr = ((ng, "p99") in M && M[ng, "p99"] > 0) ? sprintf("%.2f", M[k, "p99"] / M[ng, "p99"]) : "-"
            printf "%-11s %5s %7.0f (%4.1f-%4.1f) %6.3f (%5.3f-%5.3f) %6.3f (%5.3f-%5.3f) %6.4f (%.4f-%.4f) %6.0f %9.1f %9d %9s %9s %9s\n",
                name, c,
                M[k, "rps"], L[k, "rps"] / 1000, H[k, "rps"] / 1000,
                M[k, "p50"], L[k, "p50"], H[k, "p50"],
                M[k, "p99"], L[k, "p99"], H[k, "p99"],
                M[k, "cpu"], L[k, "cpu"], H[k, "cpu"],
                M[k, "cpu"] * M[k, "rps"] / 100,
                H[k, "hwm"] / 1024, M[k, "conn"], rr, cr, pr
        }
        print "(req/s range in thousands; CPU % is the proxy'"'"'s share of one core; req/CPU-s is NGINX CPU-s per"
        print " request over this proxy'"'"'s: above 1 is cheaper than NGINX)"
        # Paired: the ratio within each round (the proxies ran back to back in it), then the
        # median of those. Drift between rounds (neighbours on a shared host) cancels in a
        # pair, where it widens the per-proxy medians above.
        printf "\n%-11s %5s %24s %24s %14s %14s\n", "paired", "conns", "req/CPU-s vs NGINX", "p99/NGINX", "user us/req", "kernel us/req"
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, kk, SUBSEP); name = kk[1]; c = kk[2]
            ng = "nginx" SUBSEP c
            cr = pr = "-"
            if (name != "nginx" && cnt[ng SUBSEP "cpu"] == cnt[k SUBSEP "cpu"]) {
                n = cnt[k SUBSEP "cpu"]
                for (r = 1; r <= n; r++) {
                    val["pc", r] = val[k SUBSEP "cpu", r] > 0 ? val[ng SUBSEP "cpu", r] / val[k SUBSEP "cpu", r] : 0
                    val["pp", r] = val[ng SUBSEP "p99", r] > 0 ? val[k SUBSEP "p99", r] / val[ng SUBSEP "p99", r] : 0
                }
                cnt["pc"] = cnt["pp"] = n
                m = med("pc"); cr = sprintf("%.2f (%.2f-%.2f)", m, lo["pc"], hi["pc"])
                m = med("pp"); pr = sprintf("%.2f (%.2f-%.2f)", m, lo["pp"], hi["pp"])
            }
            us = cnt[k SUBSEP "usr"] ? sprintf("%.2f", med(k SUBSEP "usr")) : "-"
            ks = cnt[k SUBSEP "sys"] ? sprintf("%.2f", med(k SUBSEP "sys")) : "-"
            printf "%-11s %5s %24s %24s %14s %14s\n", name, c, cr, pr, us, ks
        }
        print "(medians of the per-round ratios, min-max; user and kernel: the proxy'"'"'s CPU per request, split)"
    }' "$RESULTS"
}

available_proxies() {
    local p list=()
    for p in ${PROXIES:-meridian nginx haproxy}; do
        case $p in
        nginx | haproxy) have "$p" || {
            log "skipping $p: not installed"
            continue
        } ;;
        esac
        list+=("$p")
    done
    echo "${list[@]}"
}

throughput() {
    local proxies round c p
    read -r -a proxies <<<"$(available_proxies)"
    log "throughput: ${proxies[*]} pinned to CPU $PROXY_CPU; wrk and upstream on CPU $LOAD_CPU"
    for p in "${proxies[@]}"; do start_proxy "$p" 1; done
    for p in "${proxies[@]}"; do log "  $p idle RSS $(mem_kib VmRSS "${PID[$p]}") KiB"; done
    for round in $(seq 1 "$ROUNDS"); do
        for c in $CONNS; do
            # A B C, A B C: drift (thermal, neighbours) spreads over every proxy alike.
            for p in "${proxies[@]}"; do run_wrk "$p" "$c" throughput; done
        done
    done
    for p in "${proxies[@]}"; do stop_proxy "$p"; done
    summarise throughput
    if [ "${H2C:-1}" = 1 ] && have h2load; then h2c; fi
}

# h2c with prior knowledge (Meridian's listener speaks it; NGINX's on H2C_NGINX_PORT), 50
# clients x 10 streams: requests per second and per proxy CPU-second, ROUNDS interleaved
# runs of DURATION seconds each, as the HTTP/1.1 phase.
h2c() {
    local proxies=() p round
    for p in $(available_proxies); do
        case $p in meridian | meridian-b | nginx) proxies+=("$p") ;; esac
    done
    log "h2c: ${proxies[*]}; h2load -c50 -m10, ${DURATION} s runs"
    for p in "${proxies[@]}"; do start_proxy "$p" 1; done
    for round in $(seq 1 "$ROUNDS"); do
        for p in "${proxies[@]}"; do run_h2load "$p"; done
    done
    for p in "${proxies[@]}"; do stop_proxy "$p"; done
    summarise h2c
}

# run_h2load NAME: one measured h2load run against NAME, appended to $RESULTS (tag h2c;
# h2load reports no percentiles, so the p50 and p99 columns hold its mean and max).
run_h2load() {
    local name=$1 port out t0 t1 u0 u1 rps mean max cpu user hwm
    case $name in nginx) port=$H2C_NGINX_PORT ;; *) port=${PORT[$name]} ;; esac
    local url="http://127.0.0.1:$port$PATH_UNDER_TEST"
    taskset -c "$LOAD_CPU" h2load -D "$WARMUP" -c 50 -m 10 -t 1 -H "X-Forwarded-For: $XFF" "$url" >/dev/null 2>&1 || true
    t0=$(cpu_ticks "${PID[$name]}")
    u0=$(cpu_ticks "${PID[$name]}" user)
    out=$(taskset -c "$LOAD_CPU" h2load -D "$DURATION" -c 50 -m 10 -t 1 -H "X-Forwarded-For: $XFF" "$url" 2>&1 || true)
    t1=$(cpu_ticks "${PID[$name]}")
    u1=$(cpu_ticks "${PID[$name]}" user)
    echo "$out" >"$RUN/h2load-$name.txt"
    # "finished in 10.00s, 41234.50 req/s, ..." and "time for request: min max mean sd ...".
    rps=$(echo "$out" | awk '/^finished in/ {gsub(",", "", $4); print $4}')
    mean=$(echo "$out" | awk '/^time for request:/ {print $6}' | to_ms)
    max=$(echo "$out" | awk '/^time for request:/ {print $5}' | to_ms)
    local failed
    failed=$(echo "$out" | awk '/^requests:/ {print $10 + $12 + $14}')
    [ "${failed:-0}" != 0 ] && log "  h2c $name: $failed requests failed, errored or timed out"
    # h2load -D counts requests over DURATION; the CPU ticks cover the same window (the
    # connections' setup is in it too, as wrk's are).
    cpu=$(cpu_per_10k $((t1 - t0)) "${rps:-0}")
    user=$(user_share $((u1 - u0)) $((t1 - t0)))
    hwm=$(mem_kib VmHWM "${PID[$name]}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' h2c "$name" 50x10 "${rps:-0}" "${mean:-0}" "${max:-0}" "$cpu" "$hwm" 0 "$user" >>"$RESULTS"
    log "  h2c $name: ${rps} req/s, mean ${mean} ms, max ${max} ms, ${cpu} CPU-s/10k (${user} % user)"
}

# Syscalls per request (perf's raw_syscalls:sys_enter tracepoint over the proxy's process
# tree) during a DURATION-second h2load run of 50 connections, HTTP/1.1 and then h2c with
# 10 streams each: the kernel crossings a request costs, which is most of its CPU.
syscalls() {
    have perf || die "syscalls: perf is not installed (apt-get install -y linux-perf)"
    have h2load || die "syscalls: h2load is not installed (apt-get install -y nghttp2-client)"
    local proxies=() p mode port out pids count requests
    for p in $(available_proxies); do
        case $p in meridian | meridian-b | nginx) proxies+=("$p") ;; esac
    done
    log "syscalls: ${proxies[*]}; h2load -c50 (HTTP/1.1, then h2c -m10), ${DURATION} s runs"
    for p in "${proxies[@]}"; do
        start_proxy "$p" 1
        for mode in h1 h2c; do
            local args=(--h1)
            port=${PORT[$p]}
            if [ "$mode" = h2c ]; then
                args=(-m 10)
                [ "$p" = nginx ] && port=$H2C_NGINX_PORT
            fi
            local url="http://127.0.0.1:$port$PATH_UNDER_TEST"
            taskset -c "$LOAD_CPU" h2load "${args[@]}" -D "$WARMUP" -c 50 -t 1 -H "X-Forwarded-For: $XFF" "$url" >/dev/null 2>&1 || true
            pids=$(pids_of "${PID[$p]}" | paste -sd, -)
            perf stat -e raw_syscalls:sys_enter -p "$pids" -o "$RUN/perf-$p-$mode.txt" &
            local perf_pid=$!
            out=$(taskset -c "$LOAD_CPU" h2load "${args[@]}" -D "$DURATION" -c 50 -t 1 -H "X-Forwarded-For: $XFF" "$url" 2>&1 || true)
            kill -INT "$perf_pid" 2>/dev/null || true
            wait "$perf_pid" 2>/dev/null || true
            count=$(awk '/raw_syscalls:sys_enter/ {gsub(",", "", $1); print $1}' "$RUN/perf-$p-$mode.txt")
            requests=$(echo "$out" | awk '/^requests:/ {print $8}')
            log "  syscalls $p $mode: ${requests:-0} requests, ${count:-0} syscalls, $(awk -v s="${count:-0}" -v n="${requests:-0}" \
                'BEGIN { if (n > 0) printf "%.2f", s / n; else print "nan" }') per request"
        done
        stop_proxy "$p"
    done
}

# What the latency tail is made of: for each proxy, one wrk run at the last of CONNS with
# the percentiles past p99, while perf records the scheduler's switches on PROXY_CPU;
# offcpu.py then tells the proxy's stretches off its CPU: waits (nothing ready for it) and
# preemptions (and by whom). Not part of `all`: it needs perf and the sched tracepoints.
sched() {
    have perf || die "sched: perf is not installed (apt-get install -y linux-perf)"
    local proxies=() p c url pids worker
    read -r -a proxies <<<"$(available_proxies)"
    c=${CONNS##* }
    cat >"$RUN/percentiles.lua" <<'LUA'
done = function(summary, latency, requests)
  local out = ""
  for _, p in ipairs({50, 90, 99, 99.5, 99.9}) do
    out = out .. string.format("p%s %.2f ms  ", p, latency:percentile(p) / 1000)
  end
  io.write(out .. string.format("max %.2f ms\n", latency.max / 1000))
end
LUA
    log "sched: ${proxies[*]} at $c connections, ${DURATION} s runs; scheduler switches on CPU $PROXY_CPU"
    for p in "${proxies[@]}"; do
        start_proxy "$p" 1
        url="http://127.0.0.1:${PORT[$p]}$PATH_UNDER_TEST"
        taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$c" -d"${WARMUP}s" -H "X-Forwarded-For: $XFF" "$url" >/dev/null
        taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$c" -d"${DURATION}s" -s "$RUN/percentiles.lua" \
            -H "X-Forwarded-For: $XFF" "$url" >"$RUN/sched-wrk-$p.txt" &
        local wrk_pid=$!
        # Inside the run only: what follows its end is idle time, not a tail.
        sleep 0.5
        perf record -q -e sched:sched_switch -C "$PROXY_CPU" -o "$RUN/sched-$p.data" -- sleep $((DURATION - 1)) >/dev/null 2>&1 || true
        wait "$wrk_pid" || true
        # The thread that serves: NGINX's worker (a child), Meridian's one runtime thread.
        pids=$(pids_of "${PID[$p]}")
        worker=$(echo "$pids" | tail -1)
        perf script -i "$RUN/sched-$p.data" -F time,event,trace 2>/dev/null >"$RUN/sched-$p.txt" || true
        echo "== $p: $(tail -1 "$RUN/sched-wrk-$p.txt")"
        python3 "$LOAD/offcpu.py" "$RUN/sched-$p.txt" "$worker" 5
        stop_proxy "$p"
    done
}

# Keep-alive HTTPS requests per CPU-second, and full handshakes per CPU-second (every
# request on a new connection: `Connection: close`; wrk does not resume sessions and NGINX
# has tickets and its session cache off), for Meridian and NGINX.
tls() {
    local proxies=() p round
    [ -f "$RUN/cert.pem" ] || die "tls: no certificate (openssl is needed to make one)"
    for p in $(available_proxies); do
        [ -n "${TLS_PORT[$p]:-}" ] && proxies+=("$p")
    done
    log "tls: ${proxies[*]}; TLS 1.3, ECDSA P-256, $TLS_CONNS connections"
    for p in "${proxies[@]}"; do start_proxy "$p" 1; done
    for p in "${proxies[@]}"; do wait_port "${TLS_PORT[$p]}"; done
    WRK_SCHEME=https
    for round in $(seq 1 "$ROUNDS"); do
        for p in "${proxies[@]}"; do
            WRK_EXTRA=()
            run_wrk "$p" "$TLS_CONNS" tls-keepalive
            WRK_EXTRA=(-H "Connection: close")
            run_wrk "$p" "$TLS_CONNS" tls-handshake
        done
    done
    WRK_SCHEME=http
    WRK_EXTRA=()
    for p in "${proxies[@]}"; do stop_proxy "$p"; done
    summarise tls-keepalive
    summarise tls-handshake
}

# Connections from proxies to the upstream that are open now (the upstream's side of them).
upstream_open() {
    ss -Htn state established "( sport = :${UPSTREAM##*:} )" 2>/dev/null | wc -l
}

# A burst of chat clients: N connect and send one request at once, then stay idle; RSS per
# connection while they are open, idle upstream connections the proxy keeps, and RSS
# BURST_AFTER s after the clients have gone.
burst() {
    local proxies p n rss0 rss1 rss2 up1 up2 out probe ready closed
    read -r -a proxies <<<"$(available_proxies)"
    log "burst: ${BURST_CLIENTS} clients at once, held ${BURST_HOLD} s; RSS ${BURST_AFTER} s after they close"
    for n in $BURST_CLIENTS; do
        for p in "${proxies[@]}"; do
            start_proxy "$p" 1
            sleep 2
            rss0=$(mem_kib VmRSS "${PID[$p]}")
            out=$RUN/burst-$p-$n.out
            taskset -c "$LOAD_CPU" "$BIN_DIR/load_probe" burst "127.0.0.1:${PORT[$p]}" "$n" "$BURST_HOLD" >"$out" &
            probe=$!
            ready=$(wait_ready "$out" 600)
            sleep 1
            rss1=$(mem_kib VmRSS "${PID[$p]}")
            up1=$(upstream_open)
            wait "$probe" 2>/dev/null || true
            closed=$(grep -c closed "$out" || true)
            sleep "$BURST_AFTER"
            rss2=$(mem_kib VmRSS "${PID[$p]}")
            up2=$(upstream_open)
            stop_proxy "$p"
            printf 'burst\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$p" "$n" "${ready#ready }" "$rss0" "$rss1" "$rss2" "$up1" "$up2" >>"$OUT/burst.tsv"
            log "  $p n=$n: answered ${ready#ready } (closed: $closed), RSS $rss0 -> $rss1 -> $rss2 KiB, upstream conns $up1 -> $up2"
        done
    done
    echo
    echo "== burst: N clients send one request at once, then idle ${BURST_HOLD} s; then ${BURST_AFTER} s after they closed =="
    awk -F'\t' '
    { k = $2 SUBSEP $3; if (!(k in seen)) { seen[k] = 1; order[++n] = k }
      ans[k] = $4; r0[k] = $5; r1[k] = $6; r2[k] = $7; u1[k] = $8; u2[k] = $9 }
    END {
        printf "%-11s %6s %8s %9s %11s %9s %10s %12s %10s %10s %9s\n", "proxy", "N", "answered", "idle MiB", "burst MiB", "KiB/conn", "after MiB", "after-idle", "ups held", "ups after", "KiB/NGINX"
        for (i = 1; i <= n; i++) {
            k = order[i]; split(k, kk, SUBSEP)
            per = ans[k] > 0 ? (r1[k] - r0[k]) / ans[k] : 0
            ng = "nginx" SUBSEP kk[2]
            ratio = ((ng in ans) && ans[ng] > 0 && r1[ng] > r0[ng]) ? sprintf("%.2f", per / ((r1[ng] - r0[ng]) / ans[ng])) : "-"
            printf "%-11s %6s %8s %9.1f %11.1f %9.2f %10.1f %12.1f %10s %10s %9s\n", kk[1], kk[2], ans[k], r0[k] / 1024, r1[k] / 1024, per, r2[k] / 1024, (r2[k] - r0[k]) / 1024, u1[k], u2[k], ratio
        }
        print "(ups held: upstream connections open while the idle clients are held; ups after: after they closed)"
    }' "$OUT/burst.tsv"
}

# Concurrent long SSE streams (an inference edge's steady state): N clients each hold one
# stream of STREAM_EVENTS events STREAM_GAP_MS apart; RSS is read mid-stream, once every
# stream has its first event, and divided by N.
streams() {
    local proxies p n rss0 rss1 out probe ready mid done
    read -r -a proxies <<<"$(available_proxies)"
    [ "$(ulimit -n)" -gt 19900 ] || log "open-file limit $(ulimit -n): large stream counts may not fit"
    log "streams: ${STREAMS} concurrent SSE streams of ${STREAM_EVENTS} events ${STREAM_GAP_MS} ms apart"
    for n in $STREAMS; do
        for p in "${proxies[@]}"; do
            start_proxy "$p" 1
            sleep 2
            rss0=$(mem_kib VmRSS "${PID[$p]}")
            out=$RUN/streams-$p-$n.out
            taskset -c "$LOAD_CPU" "$BIN_DIR/load_probe" streams "127.0.0.1:${PORT[$p]}" "$n" \
                "$STREAM_EVENTS" "$STREAM_GAP_MS" >"$out" 2>"$RUN/streams-$p-$n.err" &
            probe=$!
            ready=$(wait_ready "$out" 600)
            sleep 1
            rss1=$(mem_kib VmRSS "${PID[$p]}")
            wait "$probe" 2>/dev/null || true
            mid=$(grep -o 'mid open [0-9]*' "$out" | awk '{print $3}')
            done=$(grep -o 'done ok [0-9]* events [0-9]*' "$out" | awk '{print $3}')
            stop_proxy "$p"
            printf 'streams\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$p" "$n" "${ready#ready }" "${mid:-0}" "${done:-0}" "$rss0" "$rss1" >>"$OUT/streams.tsv"
            log "  $p n=$n: first events ${ready#ready }, open mid-stream ${mid:-?}, complete ${done:-?}, RSS $rss0 -> $rss1 KiB"
            # Loopback ports and the upstream's stream tasks wind down before the next proxy.
            sleep 2
        done
    done
    echo
    echo "== streams: N concurrent SSE streams ($STREAM_EVENTS events, $STREAM_GAP_MS ms apart), RSS read mid-stream =="
    awk -F'\t' '
    { k = $2 SUBSEP $3; if (!(k in seen)) { seen[k] = 1; order[++n] = k }
      first[k] = $4; mid[k] = $5; ok[k] = $6; r0[k] = $7; r1[k] = $8 }
    END {
        printf "%-11s %6s %8s %8s %8s %9s %10s %11s %10s\n", "proxy", "N", "started", "open mid", "complete", "idle MiB", "mid MiB", "KiB/stream", "KiB/NGINX"
        for (i = 1; i <= n; i++) {
            k = order[i]; split(k, kk, SUBSEP)
            per = mid[k] > 0 ? (r1[k] - r0[k]) / mid[k] : 0
            ng = "nginx" SUBSEP kk[2]
            ratio = ((ng in mid) && mid[ng] > 0 && r1[ng] > r0[ng]) ? sprintf("%.2f", per / ((r1[ng] - r0[ng]) / mid[ng])) : "-"
            printf "%-11s %6s %8s %8s %8s %9.1f %10.1f %11.2f %10s\n", kk[1], kk[2], first[k], mid[k], ok[k], r0[k] / 1024, r1[k] / 1024, per, ratio
        }
        print "(KiB/stream: RSS growth over the streams open at the sample; complete: streams that got every event)"
        for (i = 1; i <= n; i++) { k = order[i]; split(k, kk, SUBSEP)
            if (mid[k] < kk[2]) printf "warning: %s N=%s: only %s streams open at the sample: the others ended first; raise STREAM_EVENTS\n", kk[1], kk[2], mid[k] }
    }' "$OUT/streams.tsv"
}

# Prints the probe's "ready N" line once it is in FILE, polling TRIES times 0.1 s apart
# (nothing when it never comes).
wait_ready() {
    local file=$1 tries=$2 ready=""
    for _ in $(seq 1 "$tries"); do
        ready=$(grep -o 'ready [0-9]*' "$file" 2>/dev/null || true)
        [ -n "$ready" ] && break
        sleep 0.1
    done
    echo "$ready"
}

sse() {
    local proxies p round line
    read -r -a proxies <<<"$(available_proxies)"
    log "sse: first-event latency, $SSE_PROBES fresh connections per probe"
    for p in "${proxies[@]}"; do start_proxy "$p" 1; done
    for round in $(seq 1 "$ROUNDS"); do
        for p in direct "${proxies[@]}"; do
            line=$("$BIN_DIR/load_probe" sse "127.0.0.1:${PORT[$p]}" "$SSE_PROBES")
            printf 'sse\t%s\t%s\t%s\n' "$round" "$p" "$line" >>"$OUT/sse.tsv"
            log "  $p: $line"
        done
    done
    for p in "${proxies[@]}"; do stop_proxy "$p"; done
    echo
    echo "== sse: first event, median over rounds of each probe's p50 and p99 (µs) =="
    awk -F'\t' '{
        split($4, f, " "); for (i in f) { split(f[i], kv, "="); v[$3, kv[1], ++n[$3, kv[1]]] = kv[2] + 0 }
        if (!($3 in seen)) { seen[$3] = 1; order[++k] = $3 }
    }
    function med(p, m,   c, i, j, t, a) {
        c = n[p, m]; for (i = 1; i <= c; i++) a[i] = v[p, m, i]
        for (i = 2; i <= c; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
    }
    END {
        d50 = med("direct", "p50"); d99 = med("direct", "p99")
        printf "%-10s %8s %8s %14s\n", "path", "p50 µs", "p99 µs", "p50 - direct"
        for (i = 1; i <= k; i++) { p = order[i]; printf "%-10s %8.0f %8.0f %14.0f\n", p, med(p, "p50"), med(p, "p99"), med(p, "p50") - d50 }
    }' "$OUT/sse.tsv"
}

idle() {
    local proxies p rss0 rss1 fifo probe ready
    read -r -a proxies <<<"$(available_proxies)"
    [ "$(ulimit -n)" -gt "$((IDLE_CONNS + 100))" ] || log "open-file limit $(ulimit -n): the idle probe may stop early"
    echo
    echo "== idle: resident memory, idle and with $IDLE_CONNS open idle client connections (MiB) =="
    printf '%-10s %10s %12s %12s\n' proxy idle "with conns" "KiB/conn"
    for p in "${proxies[@]}"; do
        start_proxy "$p" 1
        sleep 2
        rss0=$(mem_kib VmRSS "${PID[$p]}")
        fifo=$RUN/idle-$p.out
        "$BIN_DIR/load_probe" idle "127.0.0.1:${PORT[$p]}" "$IDLE_CONNS" 15 >"$fifo" &
        probe=$!
        ready=$(wait_ready "$fifo" 300)
        sleep 1
        rss1=$(mem_kib VmRSS "${PID[$p]}")
        wait "$probe" 2>/dev/null || true
        stop_proxy "$p"
        awk -v p="$p" -v a="$rss0" -v b="$rss1" -v n="$IDLE_CONNS" -v r="${ready:-probe did not finish}" \
            'BEGIN { printf "%-10s %10.1f %12.1f %12.2f   (%s)\n", p, a / 1024, b / 1024, (b - a) / n, r }'
    done
}

mem() {
    local secs=$MEM_SECONDS step=5 elapsed=0 first="" rss max=0 samples=()
    log "mem: Meridian RSS every ${step} s over a ${secs} s wrk run at 256 connections"
    start_proxy meridian 1
    taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c256 -d"${secs}s" -H "X-Forwarded-For: $XFF" \
        "http://127.0.0.1:${PORT[meridian]}$PATH_UNDER_TEST" >"$RUN/wrk-mem.txt" &
    local wrk=$!
    while [ "$elapsed" -lt "$secs" ]; do
        sleep "$step"
        elapsed=$((elapsed + step))
        rss=$(mem_kib VmRSS "${PID[meridian]}")
        samples+=("$rss")
        [ -z "$first" ] && first=$rss
        [ "$rss" -gt "$max" ] && max=$rss
    done
    wait "$wrk" || true
    stop_proxy meridian
    echo
    echo "== mem: Meridian VmRSS (KiB) every ${step} s under load =="
    echo "${samples[*]}"
    echo "first $first KiB, last ${samples[-1]} KiB, max $max KiB, growth after the first sample $((samples[-1] - first)) KiB"
    awk '/^Requests\/sec:/ {print "throughput during the run: " $2 " req/s"}' "$RUN/wrk-mem.txt"
}

scale() {
    local round t
    log "scale: Meridian with 1 and 2 worker threads; proxy, wrk and upstream all share CPUs 0-1"
    for round in $(seq 1 "$ROUNDS"); do
        for t in 1 2; do
            start_proxy meridian "$t" 0,1
            PORT[meridian-${t}t]=${PORT[meridian]}
            PID[meridian-${t}t]=${PID[meridian]}
            # The load generator gets both cores too and two threads, so it is not the cap.
            LOAD_CPU=0,1 WRK_THREADS=2 run_wrk "meridian-${t}t" 256 scale
            stop_proxy meridian
        done
    done
    summarise scale
}

main() {
    have wrk || die "wrk is not installed (apt-get install -y wrk)"
    # Every proxy and probe started below inherits this: 10k idle connections need the room.
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    local phases=("$@")
    [ ${#phases[@]} -eq 0 ] && phases=(all)
    [ "${phases[0]}" = all ] && phases=(throughput tls burst sse streams idle mem scale)
    build
    : >"$RESULTS"
    if have openssl; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -keyout "$RUN/key.pem" -out "$RUN/cert.pem" -subj /CN=localhost \
            -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
    fi
    start_upstream
    log "results in $OUT; $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    for phase in "${phases[@]}"; do
        case $phase in
        throughput | h2c | syscalls | sched | tls | burst | sse | streams | idle | mem | scale) "$phase" ;;
        *) die "unknown phase $phase" ;;
        esac
    done
    log "upstream accepted $(upstream_accepted) connections in total"
}

main "$@"

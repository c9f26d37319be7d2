# Shared by instructions.sh and cache_misses.sh (sourced, not run): the ports they use, the
# fast upstream, and the configs Meridian and NGINX run with under valgrind.
# Expects ROOT, RUN, EXAMPLES and a STARTED array from the caller.

# wait_port PORT: returns once something listens on 127.0.0.1:PORT (valgrind starts slowly:
# up to 120 s), exits otherwise.
wait_port() {
    local i
    for i in $(seq 1 1200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing on port $1" >&2
    exit 1
}

# ports_free PORT...: exits when one is taken (a benchmark running?).
ports_free() {
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is taken (a benchmark running?)" >&2
            exit 1
        fi
    done
}

# start_upstream: the fast local upstream on 18080, answering GET /v1/models at once.
start_upstream() {
    "${FAST_UPSTREAM:-$EXAMPLES/fast_upstream}" 127.0.0.1:18080 2>"$RUN/upstream.log" &
    STARTED+=($!)
    wait_port 18080
}

# write_configs: $RUN/meridian.toml (one worker; CONFIG_SED, a sed script applied to it, e.g.
# '/^\[upstream\]/,$d' for an older build) and $RUN/nginx/ (one worker, benches/load/nginx.conf,
# run with `-p $RUN/nginx/ -c nginx.conf -g 'daemon off; master_process off;'`).
write_configs() {
    sed -e "s/^worker_threads = .*/worker_threads = 1/" -e "${CONFIG_SED:-}" \
        "$ROOT/benches/load/meridian.toml" >"$RUN/meridian.toml"
    mkdir -p "$RUN/nginx/tmp"
    cp "$ROOT/benches/load/nginx.conf" "$RUN/nginx/"
    : >"$RUN/nginx/tls.conf"
}

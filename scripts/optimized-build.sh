#!/usr/bin/env bash
# The release build the Docker image ships: profile-guided (PGO). Meridian is built once
# instrumented, serves the traffic of examples/profile_load (HTTP/1.1 GETs and POSTs, SSE,
# h2c, HTTPS over both versions, the access log on and off), and is built again with that
# profile, which tells LLVM what is hot: the request path inlined and laid out together, its
# rare branches moved out of line. Then the result serves the same traffic, every answer
# checked. Same source, same behaviour; less CPU a request (BENCHMARKS.md, twenty-third
# part: the HTTP/1.1 path was bound by instruction-cache misses).
#
# Usage: scripts/optimized-build.sh [OUT]   (default target/optimized/meridian)
# Needs only the Rust toolchain: llvm-profdata comes from rustup's llvm-tools component
# (added when missing), which matches rustc's own LLVM as PGO requires.
# REQUESTS=20000: requests of each kind in the training traffic. The builds live in
# target/pgo-generate and target/pgo-use (CARGO_TARGET_DIR moves them), so the plain
# release build is left alone and a rerun recompiles only what changed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/target/optimized/meridian}
REQUESTS=${REQUESTS:-20000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata

log() { echo "optimized-build: $*" >&2; }

if [ ! -x "$PROFDATA" ]; then
    log "adding rustup's llvm-tools for llvm-profdata"
    rustup component add llvm-tools >&2 || {
        log "no llvm-profdata (rustup component add llvm-tools failed): not built"
        exit 2
    }
fi

cd "$ROOT"
WORK=$(mktemp -d /tmp/meridian-pgo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# The traffic's tools: an ordinary (debug) build is fast enough to drive an instrumented proxy.
cargo build --locked --quiet --example fast_upstream --example profile_load
TOOLS=$TARGET_DIR/debug/examples

# --target keeps RUSTFLAGS off build scripts and proc macros, which would otherwise be
# instrumented and profiled as they run inside the compiler. The profile directory in the
# flags stays the same from run to run (so a rerun is incremental); LLVM_PROFILE_FILE puts
# this run's profile in $WORK.
log "building instrumented"
RUSTFLAGS="-Cprofile-generate=$TARGET_DIR/pgo-generate/profiles" \
    cargo build --release --locked --quiet --bin meridian --target "$HOST" \
    --target-dir "$TARGET_DIR/pgo-generate"
log "training"
LLVM_PROFILE_FILE="$WORK/raw/meridian-%p-%m.profraw" \
    "$TOOLS/profile_load" "$TARGET_DIR/pgo-generate/$HOST/release/meridian" "$REQUESTS"
"$PROFDATA" merge -o "$WORK/meridian.profdata" "$WORK/raw"

# The profile's path names its content, so cargo sees a new profile as new flags and
# rebuilds what it shapes (the flags, not the file, are in cargo's fingerprint).
SUM=$(sha256sum "$WORK/meridian.profdata" | cut -c1-16)
PROFILE=$TARGET_DIR/pgo-use/meridian-$SUM.profdata
mkdir -p "$TARGET_DIR/pgo-use"
rm -f "$TARGET_DIR"/pgo-use/meridian-*.profdata
cp "$WORK/meridian.profdata" "$PROFILE"
log "building with the profile"
RUSTFLAGS="-Cprofile-use=$PROFILE" \
    cargo build --release --locked --quiet --bin meridian --target "$HOST" \
    --target-dir "$TARGET_DIR/pgo-use"
BUILT=$TARGET_DIR/pgo-use/$HOST/release/meridian

log "checking the optimised build with the same traffic"
"$TOOLS/profile_load" "$BUILT" "$((REQUESTS / 4))"
mkdir -p "$(dirname "$OUT")"
install -m 0755 "$BUILT" "$OUT"
log "$OUT"

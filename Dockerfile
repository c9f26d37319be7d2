# syntax=docker/dockerfile:1
# Meridian: multi-stage build, distroless runtime, numeric non-root user.
# Build:  docker build -t meridian .
# Run:    docker run -p 8080:8080 -p 9901:9901 -e MERIDIAN_ADMIN_TOKEN=secret meridian
#         (your own config: -v "$PWD/my-config:/etc/meridian:ro")
# Lint:   hadolint Dockerfile   (.ci/run does; accepted warnings are marked below with why)

# The build image's Debian matches the runtime's (bookworm = debian12), so the glibc the
# binary links against is the one it runs on.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# The shipped binary is the profile-guided build (scripts/optimized-build.sh; BENCHMARKS.md,
# twenty-third part): built instrumented, trained on loopback traffic inside this step,
# rebuilt with the profile, checked with the same traffic. llvm-profdata must come from
# rustc's own LLVM: rustup's llvm-tools component.
RUN rustup component add llvm-tools

COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY geoip ./geoip
COPY benches ./benches
COPY examples ./examples
COPY scripts ./scripts
# The cache mounts keep the registry and target/ from one build to the next, so a source
# edit recompiles Meridian, not its dependencies (the profile-guided build recompiles them
# whenever the profile changes, which is every build: that is the price of the profile).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/optimized-build.sh /out/meridian

# Runtime: `ldd target/optimized/meridian` lists only glibc (libc, libm; symbols up to
# GLIBC_2.34, bookworm has 2.36), libgcc_s and the loader; TLS roots are compiled in
# (webpki-roots) and the GeoIP database is embedded. So
# distroless/cc (glibc + libgcc, no shell, no package manager) is all it needs; the
# `healthcheck` subcommand stands in for curl.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meridian /usr/local/bin/meridian
# Licence of Meridian and of the data embedded in the binary (ip-location-db, CC BY 4.0;
# mledoze/countries, ODbL 1.0).
COPY LICENSE NOTICE THIRD_PARTY.md /usr/share/doc/meridian/
COPY geoip/NRO_LICENSE geoip/COUNTRIES_LICENSE /usr/share/doc/meridian/
# Admin on all interfaces (probes, Prometheus), token from the environment (a Secret),
# shutdown_delay = "5s" so load balancers stop sending before the listener closes.
COPY deploy/container/meridian.toml /etc/meridian/meridian.toml
# Numeric, so Kubernetes can check `runAsNonRoot` without reading /etc/passwd.
USER 10001:10001
# Proxy (HTTP/1.1 + h2c), TLS (when server.tls_listen is set), admin.
EXPOSE 8080 8443 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/meridian", "healthcheck", "-c", "/etc/meridian/meridian.toml"]
ENTRYPOINT ["/usr/local/bin/meridian"]
CMD ["run", "-c", "/etc/meridian/meridian.toml"]

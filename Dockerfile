# Meridian: multi-stage build, small runtime image, non-root user.
# Build:  docker build -t meridian .
# Run:    docker run -p 8080:8080 -v $PWD/config:/etc/meridian:ro meridian
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY geoip ./geoip
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin meridian

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home meridian
COPY --from=build /src/target/release/meridian /usr/local/bin/meridian
COPY config/meridian.toml /etc/meridian/meridian.toml
USER meridian
EXPOSE 8080 8443
# The config is read from /etc/meridian/meridian.toml: mount your own directory there.
ENTRYPOINT ["/usr/local/bin/meridian"]
CMD ["run", "-c", "/etc/meridian/meridian.toml"]

# keygate container image: release build on distroless (glibc, no shell, runs as uid 65532).
#
# Build, from the repository root:
#   docker build -t keygate:latest .
#
# Run with your own config mounted over the built-in one:
#   docker run --rm -p 8080:8080 \
#     -v $PWD/my.toml:/etc/keygate/keygate.toml:ro \
#     -e API_KEY=... -e SHARED_SECRET=... \
#     keygate:latest
#
# The built-in config (config/keygate.toml) listens on 0.0.0.0:8080, forwards to
# http://127.0.0.1:8000 and needs API_KEY and SHARED_SECRET set. Inside a container,
# 127.0.0.1 is the container itself: share the origin's network namespace (a pod sidecar,
# or `docker run --network container:NAME`) or point [upstream] url at the origin.
#
# Terminating TLS (see config/examples/tls.toml): mount the PEM files and the config, e.g.
#   docker run --rm -p 443:8443 -p 80:8080 \
#     -v $PWD/tls:/etc/keygate/tls:ro -v $PWD/tls.toml:/etc/keygate/keygate.toml:ro \
#     -e API_KEY=... -e SHARED_SECRET=... keygate:latest
#
# Arguments after the image name replace the default `--config /etc/keygate/keygate.toml`,
# so repeat it when adding flags:
#   docker run --rm keygate:latest keygen
#   docker run --rm -v ... -e ... keygate:latest check --config /etc/keygate/keygate.toml
#   docker run --rm -v ... -e ... keygate:latest --config /etc/keygate/keygate.toml --log-format text

FROM rust:1.95-bookworm AS build
WORKDIR /build

# Dependencies first, compiled against placeholder sources: this layer is reused until
# Cargo.toml or Cargo.lock changes. `cargo clean -p keygate` then drops the placeholder's
# artifacts so that the real sources are always compiled, whatever their timestamps.
# Cargo refuses a manifest whose [[bench]] file is missing, so benches/micro.rs gets a
# placeholder too (and the real benches/ is copied below); the release build never compiles it.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/micro.rs \
 && cargo build --release --locked \
 && cargo clean --release --locked -p keygate \
 && rm -rf src benches

COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked

# Copied after the build so that editing the config does not recompile.
COPY config ./config

# Debian 12 (bookworm) on both sides: the binary's glibc matches the runtime's.
# No OpenSSL and no CA bundle needed: TLS is rustls with ring (its C and assembly are
# compiled above by the rust image's gcc), and https upstreams are verified against the
# webpki roots built into the binary (or a mounted [upstream] ca_file).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /build/target/release/keygate /usr/local/bin/keygate
COPY --from=build /build/config/keygate.toml /etc/keygate/keygate.toml
# nonroot:nonroot of the distroless image, written as numbers so that Kubernetes
# `runAsNonRoot: true` can verify it.
USER 65532:65532
EXPOSE 8080
# No HEALTHCHECK: the image has no shell or curl; orchestrators probe GET /health.
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["--config", "/etc/keygate/keygate.toml"]

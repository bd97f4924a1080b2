# syntax=docker/dockerfile:1
#
# keel-scraper container image.
#
#   docker build -t keel-scraper:0.1.0 .
#
# The build stage compiles the release binary from the locked dependency set; the runtime
# stage is distroless (glibc and CA certificates, no shell, no package manager) and runs as
# the unprivileged `nonroot` user (65532), which the Helm chart's securityContext expects.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the target directory between builds; the binary is
# copied out of the cached target directory because cache mounts are not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keel-scraper \
    && install -D -m 0755 target/release/keel-scraper /out/keel-scraper

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="keel-scraper" \
      org.opencontainers.image.description="Keeps tKeel plugin routes true for the Keel gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/keel-scraper /usr/local/bin/keel-scraper
USER 65532:65532
# Metrics (/metrics), liveness (/healthz) and readiness (/readyz).
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/keel-scraper"]
CMD ["run"]

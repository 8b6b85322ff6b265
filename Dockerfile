# syntax=docker/dockerfile:1
# sluice in one image: the writer (`sluice run`), the jobs (`compact`, `vacuum`, `audit`),
# the SQL shell and the demo producer. Schemas, mappings, configs and the sql/ library are
# under /etc/sluice.
#
#   docker build -t sluice .
#   docker run --rm sluice --help

FROM rust:1.95-bookworm AS build
WORKDIR /src
# rdkafka builds librdkafka from source with TLS and SASL (the system's OpenSSL) and OAUTHBEARER
# OIDC (the system's libcurl); the image has cc, make, perl and pkg-config already.
# The release profile keeps line tables for backtraces; the image does not need them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev libcurl4-openssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY schemas schemas
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && cp target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim
# ca-certificates for AWS S3 and Kafka over TLS; libssl3 and libcurl4 for librdkafka (TLS,
# SASL, OIDC); curl for the compose health check of /readyz.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
COPY schemas /etc/sluice/schemas
COPY config /etc/sluice/config
COPY sql /etc/sluice/sql
USER sluice
WORKDIR /var/lib/sluice
EXPOSE 9464
ENTRYPOINT ["sluice"]
CMD ["run", "--config", "/etc/sluice/config/minio.toml"]

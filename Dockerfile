# syntax=docker/dockerfile:1
# The `palaver` image (one binary; subcommands serve|gateway|node|push-worker|migrate|token).
# The Helm chart in helm/palaver runs it as ghcr.io/palaver-chat/palaver:<appVersion>.
#
#   docker build -t ghcr.io/palaver-chat/palaver:0.1.0 .
#   docker run --rm -p 8080:8080 ghcr.io/palaver-chat/palaver:0.1.0        # palaver serve
#
# Build stage: the whole workspace (Cargo.lock is honoured with --locked). librdkafka is built
# from source by rdkafka-sys (make and a C/C++ compiler, both in the rust image); the gRPC code
# is generated without protoc.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p palaver-gateway --locked \
 && install -D -m 0755 target/release/palaver /out/palaver

# Runtime stage: Debian slim (the binary links libz and glibc dynamically) with the CA bundle
# for FCM, webhooks, S3 and PostgreSQL over TLS.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 palaver \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin palaver \
 && install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=build /out/palaver /usr/local/bin/palaver
ENV PALAVER_HTTP_ADDR=0.0.0.0:8080 \
    PALAVER_DATA_DIR=/data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
ENTRYPOINT ["palaver"]
CMD ["serve"]

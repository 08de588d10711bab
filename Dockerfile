# syntax=docker/dockerfile:1
# Build stage: the release binary, with dependencies cached in their own layer.
FROM rust:1-slim-bookworm AS build
# make builds jemalloc, the server's allocator.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/stickless-cluster.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin stickless \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin stickless

# Runtime stage: the binary and the chat page, run as an unprivileged user.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stickless
COPY --from=build /src/target/release/stickless /usr/local/bin/stickless
COPY static /app/static
WORKDIR /app
ENV LISTEN_ADDR=0.0.0.0:8080 \
    STATIC_DIR=/app/static \
    RUST_LOG=info
USER 10001
EXPOSE 8080
# The binary checks its own /healthz: no curl or wget in the image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["stickless", "--healthcheck"]
ENTRYPOINT ["stickless"]

# stickless images. No `# syntax=` line: that would make BuildKit pull a frontend image,
# and this file must also build where no image registry can be reached.
#
#   docker build -t stickless .
#       the default: compiles the release binary in a Rust image, runs it on Debian slim.
#   docker build --target prebuilt --build-arg BINARY=target/docker/stickless -t stickless .
#       takes a binary built outside the image (copy it to target/docker/ first: the
#       rest of target/ is not sent to the daemon). The binary must link against the
#       runtime base's C library: build it on the same Debian release.
#
# Build arguments name the base images, so local images can stand in for the public
# ones (scripts/compose-test.sh builds its own from Debian's packages).
ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# What every runtime image has: an unprivileged user, the chat page, the settings for a
# container, and a health check. The binary comes from one of the two stages below.
FROM ${RUNTIME_IMAGE} AS runtime-base
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stickless
COPY static /app/static
WORKDIR /app
ENV LISTEN_ADDR=0.0.0.0:8080 \
    STATIC_DIR=/app/static \
    RUST_LOG=info
EXPOSE 8080
# The binary checks its own /healthz: no curl or wget in the image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["stickless", "--healthcheck"]
ENTRYPOINT ["stickless"]

# A binary built outside the image. This stage comes before the Rust build on purpose:
# the classic builder runs every stage up to the target, so `--target prebuilt` never
# needs the Rust image. For the same reason the classic builder runs this stage for the
# default target too, where no binary is there: the wildcard lets the COPY match nothing
# (Cargo.toml is only there so that it always matches something).
FROM runtime-base AS prebuilt
ARG BINARY=target/docker/stickless
COPY Cargo.toml ${BINARY}* /tmp/prebuilt/
RUN binary="/tmp/prebuilt/$(basename "$BINARY")" \
 && if [ -f "$binary" ]; then install -m 0755 "$binary" /usr/local/bin/stickless; fi \
 && rm -rf /tmp/prebuilt
USER 10001

# Build stage: the release binary, with dependencies cached in their own layer.
FROM ${RUST_IMAGE} AS build
# make builds jemalloc, the server's allocator.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin \
 && echo 'fn main() {}' > src/main.rs \
 && mkdir -p src/bin/stickless-cluster && echo 'fn main() {}' > src/bin/stickless-cluster/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin stickless \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin stickless

# The default target: the binary built above.
FROM runtime-base AS runtime
COPY --from=build /src/target/release/stickless /usr/local/bin/stickless
USER 10001

# syntax=docker/dockerfile:1
# Weir's image: built with the example plugins, run from a slim, non-root image.
# Used by docker-compose.yml; `docker build -t weir .` on its own.

# --- build: the gateway, the demo origin and the plugins (components for wasm32) ---
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-unknown-unknown
COPY . .
# The registry and the build directory are BuildKit cache mounts: a change to Weir's code
# rebuilds Weir, not its dependencies (wasmtime is most of the build). What the runtime stage
# needs is copied out of the cache into /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out/bin /out/plugins \
 && cp target/release/weir target/release/weir-demo-origin /out/bin/ \
 && for p in catalog tenant-key llm-cost; do target/release/weir plugin build plugins/$p -o /out/plugins/$p.wasm || exit 1; done

# --- runtime: no compiler, no shell tools beyond Debian's base, no root ---
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /out/bin/weir /out/bin/weir-demo-origin /usr/local/bin/
COPY --from=build /out/plugins/catalog.wasm /out/plugins/tenant-key.wasm /out/plugins/llm-cost.wasm /etc/weir/plugins/
COPY policies /etc/weir/policies
USER 10001
EXPOSE 8080 9901
# A slim image has no curl: `weir health` asks the admin API's /readyz itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["weir", "health", "--addr", "127.0.0.1:9901", "--path", "/readyz"]
ENTRYPOINT ["weir"]
CMD ["run", "--config", "/etc/weir/policies/compose.yaml"]

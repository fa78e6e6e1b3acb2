# Weir's image: built with the example plugins, run from a slim, non-root image.
# Used by docker-compose.yml; `docker build -t weir .` on its own.

# --- build: the gateway, the demo origin and the plugins (components for wasm32) ---
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-unknown-unknown
COPY . .
RUN cargo build --release --locked --bins \
 && for p in catalog tenant-key llm-cost; do target/release/weir plugin build plugins/$p -o plugins/$p.wasm || exit 1; done

# --- runtime: no compiler, no shell tools beyond Debian's base, no root ---
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /src/target/release/weir /src/target/release/weir-demo-origin /usr/local/bin/
COPY --from=build /src/plugins/catalog.wasm /src/plugins/tenant-key.wasm /src/plugins/llm-cost.wasm /etc/weir/plugins/
COPY policies /etc/weir/policies
USER 10001
EXPOSE 8080 9901
# A slim image has no curl: `weir health` asks the admin API's /readyz itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["weir", "health", "--addr", "127.0.0.1:9901", "--path", "/readyz"]
ENTRYPOINT ["weir"]
CMD ["run", "--config", "/etc/weir/policies/compose.yaml"]

# Builds the weir binary and the demo origin; used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/weir /src/target/release/weir-demo-origin /usr/local/bin/
COPY policies /etc/weir/policies
EXPOSE 8080 9901
ENTRYPOINT ["weir"]
CMD ["run", "--config", "/etc/weir/policies/compose.yaml"]

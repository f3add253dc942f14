# Multi-stage build: compile with the full toolchain, ship a small non-root image.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits reuse the cached layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=build /src/target/release/smartlead-proxy /usr/local/bin/smartlead-proxy
COPY config/default.toml /app/config/default.toml
# Inside a container the proxy must be reachable from the app container.
ENV SMARTLEAD_PROXY__SERVER__LISTEN=0.0.0.0:8787
EXPOSE 8787
USER nonroot
# The key comes only from the environment: docker run -e SMARTLEAD_API_KEY=...
ENTRYPOINT ["/usr/local/bin/smartlead-proxy"]

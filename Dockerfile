# smartlead-proxy: multi-stage build, small non-root runtime image.
#   docker build -t smartlead-proxy .
#   docker run --rm -p 8787:8787 -e SMARTLEAD_API_KEY=... smartlead-proxy
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first: stub sources for every target, so this layer is reused until
# Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
# Patched crates (Cargo.toml's [patch.crates-io]) are part of the dependencies.
COPY vendor ./vendor
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for b in quota redis memory soak allocs scrub cache; do echo 'fn main() {}' > benches/$b.rs; done \
    && cargo build --release --locked \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=build /src/target/release/smartlead-proxy /usr/local/bin/smartlead-proxy
COPY config/default.toml /app/config/default.toml
# Reachable from other containers; set server.access_tokens when the port is exposed.
ENV SMARTLEAD_PROXY__SERVER__LISTEN=0.0.0.0:8787
EXPOSE 8787
USER nonroot
# distroless has no curl: the binary checks itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/smartlead-proxy", "healthcheck"]
# The API key comes only from the environment (-e SMARTLEAD_API_KEY / a secret).
ENTRYPOINT ["/usr/local/bin/smartlead-proxy"]

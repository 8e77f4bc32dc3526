# Multi-stage build of both keylimit images. Used by the kind path (hack/kind-e2e.sh) and
# release builds; our CI machines have no Docker engine and test the binaries directly.
#   docker build --target operator -t keylimit/operator:dev .
#   docker build --target sidecar  -t keylimit/sidecar:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p keylimit-operator -p keylimit-sidecar \
 && mkdir -p /out && cp target/release/keylimit-operator target/release/keylimit-sidecar /out/

# distroless/cc: glibc + libgcc, no shell, runs as 65532 (nonroot): passes Pod Security
# "restricted" with a read-only root filesystem.
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/keylimit-operator /usr/local/bin/keylimit-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/keylimit-operator"]
CMD ["run"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /out/keylimit-sidecar /usr/local/bin/keylimit-sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/keylimit-sidecar"]

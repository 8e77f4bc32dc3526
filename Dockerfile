# One recipe for both keylimit images, two ways to feed it:
#  - with internet access (defaults): binaries built in a Rust stage, public distroless base:
#      DOCKER_BUILDKIT=1 docker build --target operator -t keylimit/operator:dev .
#      DOCKER_BUILDKIT=1 docker build --target sidecar  -t keylimit/sidecar:dev .
#  - without any registry (what the kind tier tests, hack/kind/images.sh): prebuilt release
#    binaries in a small context directory and a base built here from Debian packages:
#      docker build --build-arg BINARIES=prebuilt \
#        --build-arg RUNTIME_BASE=keylimit/runtime-base:<hash> --target operator -f Dockerfile <ctx>
# BuildKit is required (DOCKER_BUILDKIT=1; Debian's docker.io 20.10 CLI has it built in, newer
# CLIs need buildx): it builds only the stages the target needs and resolves only their bases,
# so the prebuilt path never touches the Rust image. The legacy builder would build (and pull)
# every stage.
ARG BINARIES=build
ARG RUST_IMAGE=rust:1.95-bookworm
# distroless/cc: glibc + libgcc, no shell, nonroot 65532. hack/kind/images.sh builds the same
# shape from Debian packages (keylimit/runtime-base).
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS bins-build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p keylimit-operator \
 && mkdir -p /out && cp target/release/keylimit-operator "$(bash hack/build-sidecar.sh)" /out/

# The build context holds only keylimit-operator and keylimit-sidecar (never the repo's target/).
FROM scratch AS bins-prebuilt
COPY keylimit-operator keylimit-sidecar /out/

FROM bins-${BINARIES} AS bins

# Non-root (65532) with no writable path needed: passes Pod Security "restricted" with a
# read-only root filesystem.
FROM ${RUNTIME_BASE} AS operator
COPY --from=bins /out/keylimit-operator /usr/local/bin/keylimit-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/keylimit-operator"]
CMD ["run"]

FROM ${RUNTIME_BASE} AS sidecar
COPY --from=bins /out/keylimit-sidecar /usr/local/bin/keylimit-sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/keylimit-sidecar"]

# syntax=docker/dockerfile:1
#
# One image build for the four agentmesh services. The `build` stage
# compiles policy-worker, audit-sink, gpu-scaler, mcp-gateway and the
# healthcheck once;
# each service is a small runtime target on top of the same base:
#
#   docker build --target policy-worker -t agentmesh/policy-worker .
#   docker build --target audit-sink    -t agentmesh/audit-sink .
#   docker build --target gpu-scaler    -t agentmesh/gpu-scaler .
#   docker build --target mcp-gateway   -t agentmesh/mcp-gateway .
#
# Runtime: distroless (glibc, CA certificates, no shell), user `nonroot`
# (65532). Each service serves /healthz, /readyz and /metrics on 9090.
#
# Both bases are build arguments, so that the same file builds where the
# public images cannot be pulled: BUILD_IMAGE (any bookworm image with
# cargo) and RUNTIME_IMAGE (any bookworm image with glibc and CA
# certificates). BINARIES=prebuilt skips the compile and takes the five
# binaries from `.compose-bin/` in the build context instead (built on a
# bookworm host: `scripts/compose-check.sh` does this).
# With podman/buildah, pass BINARIES explicitly (`--build-arg
# BINARIES=build`; the compose files always do): buildah 1.28 looks a
# `FROM ${BINARIES}` stage up by the value given on its command line only,
# and takes the default `build` for an image name.

ARG RUST_VERSION=1.95
ARG BUILD_IMAGE=rust:${RUST_VERSION}-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARIES=build

# Bookworm, like the runtime (distroless cc-debian12): the binaries link
# against glibc and must not need a newer one than the runtime has.
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
# Dependencies and build outputs are cached between builds (BuildKit);
# the binaries are copied out of the cache mount in the same step. The
# image's binaries carry no debug info and no symbols (the workspace keeps
# line tables in release builds for profiling): policy-worker 18 MiB instead
# of 126 MiB.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p policy-worker -p audit-sink -p gpu-scaler -p mcp-gateway -p telemetry --bins \
 && mkdir -p /out \
 && cp target/release/policy-worker target/release/audit-sink \
       target/release/gpu-scaler target/release/mcp-gateway \
       target/release/agentmesh-healthcheck /out/

# The same five binaries, built outside (BINARIES=prebuilt).
FROM scratch AS prebuilt
COPY .compose-bin/ /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=binaries /out/agentmesh-healthcheck /usr/local/bin/
ENV AGENTMESH_HTTP_PORT=9090 \
    AGENTMESH_LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 9090
# distroless's `nonroot`, by number: any runtime base has that user then.
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/agentmesh-healthcheck", "/healthz"]

FROM runtime AS policy-worker
COPY --from=binaries /out/policy-worker /usr/local/bin/
# The example policies; mount your own over /etc/agentmesh/policies.
COPY policies /etc/agentmesh/policies
ENV AGENTMESH_POLICIES=/etc/agentmesh/policies
ENTRYPOINT ["/usr/local/bin/policy-worker"]

FROM runtime AS audit-sink
COPY --from=binaries /out/audit-sink /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/audit-sink"]

FROM runtime AS gpu-scaler
COPY --from=binaries /out/gpu-scaler /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/gpu-scaler"]

FROM runtime AS mcp-gateway
COPY --from=binaries /out/mcp-gateway /usr/local/bin/
# The example policies (tools/list shows what they allow); mount the
# worker's own over /etc/agentmesh/policies.
COPY policies /etc/agentmesh/policies
ENV AGENTMESH_POLICIES=/etc/agentmesh/policies \
    MCP_GATEWAY_LISTEN=0.0.0.0:8790
EXPOSE 8790
ENTRYPOINT ["/usr/local/bin/mcp-gateway"]

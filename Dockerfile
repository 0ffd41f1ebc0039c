# syntax=docker/dockerfile:1
#
# One image build for the three agentmesh services. The `build` stage
# compiles policy-worker, audit-sink, gpu-scaler and the healthcheck once;
# each service is a small runtime target on top of the same base:
#
#   docker build --target policy-worker -t agentmesh/policy-worker .
#   docker build --target audit-sink    -t agentmesh/audit-sink .
#   docker build --target gpu-scaler    -t agentmesh/gpu-scaler .
#
# Runtime: distroless (glibc, CA certificates, no shell), user `nonroot`
# (65532). Each service serves /healthz, /readyz and /metrics on 9090.

ARG RUST_VERSION=1.95

# Bookworm, like the runtime (distroless cc-debian12): the binaries link
# against glibc and must not need a newer one than the runtime has.
FROM rust:${RUST_VERSION}-slim-bookworm AS build
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
        -p policy-worker -p audit-sink -p gpu-scaler -p telemetry --bins \
 && mkdir -p /out \
 && cp target/release/policy-worker target/release/audit-sink \
       target/release/gpu-scaler target/release/agentmesh-healthcheck /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/agentmesh-healthcheck /usr/local/bin/
ENV AGENTMESH_HTTP_PORT=9090 \
    AGENTMESH_LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 9090
USER nonroot
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/agentmesh-healthcheck", "/healthz"]

FROM runtime AS policy-worker
COPY --from=build /out/policy-worker /usr/local/bin/
# The example policies; mount your own over /etc/agentmesh/policies.
COPY policies /etc/agentmesh/policies
ENV AGENTMESH_POLICIES=/etc/agentmesh/policies
ENTRYPOINT ["/usr/local/bin/policy-worker"]

FROM runtime AS audit-sink
COPY --from=build /out/audit-sink /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/audit-sink"]

FROM runtime AS gpu-scaler
COPY --from=build /out/gpu-scaler /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/gpu-scaler"]

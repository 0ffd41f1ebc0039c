//! `audit-sink`: the service skeleton's `main` (`telemetry::service::main`:
//! flags into an [`audit_sink::Config`], logging, SIGINT/SIGTERM) around
//! [`audit_sink::run`].

/// mimalloc instead of glibc malloc: the per-event path allocates and frees
/// from every runtime thread, where glibc's arenas cost a quarter of the
/// worker's CPU (the benchmarks log, `git show b22b5ef:docs/benchmarks.md`, "The worker's second pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    telemetry::service::main(
        "audit-sink",
        &["AGENTMESH_AUDIT_"],
        |config: &audit_sink::Config| &config.ops,
        audit_sink::run,
    )
    .await
}

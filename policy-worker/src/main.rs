//! `policy-worker`: the service skeleton's `main` (`telemetry::service::main`:
//! flags into a [`policy_worker::Config`], logging, SIGINT/SIGTERM) around
//! [`policy_worker::run`].

/// mimalloc instead of glibc malloc: the per-event path allocates and frees
/// from every runtime thread, where glibc's arenas cost a quarter of the
/// worker's CPU (the benchmarks log, `git show b22b5ef:docs/benchmarks.md`, "The worker's second pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    telemetry::service::main(
        "policy-worker",
        &["AGENTMESH_WORKER_"],
        |config: &policy_worker::Config| &config.ops,
        policy_worker::run,
    )
    .await
}

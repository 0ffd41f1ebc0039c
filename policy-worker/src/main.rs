//! `policy-worker`: parse the [`policy_worker::Config`] flags, start logging,
//! run until SIGINT/SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the per-event path allocates and frees
/// from every runtime thread, where glibc's arenas cost a quarter of the
/// worker's CPU (the benchmarks log, `git show b22b5ef:docs/benchmarks.md`, "The worker's second pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let command = <policy_worker::Config as clap::CommandFactory>::command();
    if let Err(error) = telemetry::check_env(&command, &["AGENTMESH_WORKER_"]) {
        eprintln!("policy-worker: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let config = policy_worker::Config::parse();
    let tracing = match telemetry::init_tracing("policy-worker", &config.ops) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("policy-worker: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
    let result = policy_worker::run(config, shutdown).await;
    tracing.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("policy-worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

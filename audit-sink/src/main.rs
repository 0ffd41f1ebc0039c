//! `audit-sink`: parses the config, starts logging, turns SIGINT/SIGTERM into
//! a shutdown token and runs [`audit_sink::run`].

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: the per-event path allocates and frees
/// from every runtime thread, where glibc's arenas cost a quarter of the
/// worker's CPU (the benchmarks log, `git show b22b5ef:docs/benchmarks.md`, "The worker's second pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let command = <audit_sink::Config as clap::CommandFactory>::command();
    if let Err(error) = telemetry::check_env(&command, &["AGENTMESH_AUDIT_"]) {
        eprintln!("audit-sink: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let config = audit_sink::Config::parse();
    let tracing = match telemetry::init_tracing("audit-sink", &config.ops) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("audit-sink: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
    let result = audit_sink::run(config, shutdown).await;
    tracing.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "Audit sink failed.");
            eprintln!("audit-sink: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `gpu-scaler`: parses flags, loads the config, starts logging, and runs
//! [`gpu_scaler::run`] until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Leases GPUs to agent pools from their JetStream backlog.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS URL and credentials.
    #[command(flatten)]
    nats: telemetry::NatsArgs,
    /// Pools config file (TOML, or JSON for a `.json` file); without one
    /// there are no pools and nothing is leased.
    #[arg(long, env = "GPU_SCALER_CONFIG")]
    config: Option<PathBuf>,
    /// File created once the scaler is ready, removed on exit.
    #[arg(long, env = "GPU_SCALER_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Instance name: lease holder and event source (default: the host name).
    #[arg(long, env = "GPU_SCALER_INSTANCE")]
    instance: Option<String>,
    /// Replicas of the MESH_* streams when they are created or updated.
    #[arg(long, env = "AGENTMESH_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// Health and metrics server, log format, OTLP export.
    #[command(flatten)]
    ops: telemetry::OpsConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing = telemetry::init_tracing("gpu-scaler", &args.ops)?;
    let config = match &args.config {
        Some(path) => gpu_scaler::Config::load(path)?,
        None => {
            tracing::warn!("No --config given: no pools, nothing will be leased.");
            gpu_scaler::Config::default()
        }
    };
    let settings = gpu_scaler::Settings {
        nats_url: args.nats.nats_url,
        credentials: broker_config::NatsCredentials {
            nkey_seed_file: args.nats.nats_nkey_seed_file,
            creds_file: args.nats.nats_creds,
        },
        config,
        instance: args.instance.unwrap_or_else(gpu_scaler::default_instance),
        ready_file: args.ready_file,
        stream_replicas: args.stream_replicas,
        ops: args.ops,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
    let result = gpu_scaler::run(settings, shutdown).await;
    tracing.shutdown().await;
    result.context("gpu-scaler")
}

//! `gpu-scaler`: parses the [`gpu_scaler::Config`] flags, starts logging, and
//! runs [`gpu_scaler::run`] until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = <gpu_scaler::Config as clap::CommandFactory>::command();
    telemetry::check_env(&command, &["GPU_SCALER_"]).context("gpu-scaler")?;
    let config = gpu_scaler::Config::parse();
    let tracing = telemetry::init_tracing("gpu-scaler", &config.ops)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
    let result = gpu_scaler::run(config, shutdown).await;
    tracing.shutdown().await;
    result.context("gpu-scaler")
}

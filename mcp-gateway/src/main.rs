//! `mcp-gateway`: parses the [`mcp_gateway::Config`] flags, starts logging,
//! and runs [`mcp_gateway::run`] until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = <mcp_gateway::Config as clap::CommandFactory>::command();
    telemetry::check_env(&command, &["MCP_GATEWAY_"]).context("mcp-gateway")?;
    let config = mcp_gateway::Config::parse();
    let tracing = telemetry::init_tracing("mcp-gateway", &config.ops)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
    let result = mcp_gateway::run(config, shutdown).await;
    tracing.shutdown().await;
    result.context("mcp-gateway")
}

//! `mcp-gateway`: the service skeleton's `main` (`telemetry::service::main`:
//! flags into a [`mcp_gateway::Config`], logging, SIGINT/SIGTERM) around
//! [`mcp_gateway::run`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    telemetry::service::main(
        "mcp-gateway",
        &["MCP_GATEWAY_"],
        |config: &mcp_gateway::Config| &config.ops,
        mcp_gateway::run,
    )
    .await
}

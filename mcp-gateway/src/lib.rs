//! The MCP gateway: MCP clients (Claude, agent frameworks, the Python `mcp`
//! SDK) call the mesh's tools over MCP's Streamable HTTP transport, and every
//! call is an ordinary `tool.call` of a registered agent through the policy
//! worker — decided, signed, audited, cached and traced like any other.
//!
//! - Each client presents a bearer token that `meshctl agents mcp-token`
//!   issued for one agent (`auth`); the gateway connects to NATS *as that
//!   agent*, with the agent's own key, so the broker's authorization applies
//!   to every event it publishes for the client exactly as to the agent
//!   itself. The gateway has no identity of its own and no right to publish
//!   for anyone else (`agents`).
//! - `tools/list` lists the tools of the cards in `mesh-agents` that the
//!   active Cedar policy set lets this caller call (`tools`);
//!   `notifications/tools/list_changed` follows the cards and the policies.
//! - `tools/call` publishes the call in the session's workflow (one trace per
//!   MCP session unless the request carries a `traceparent`) and answers with
//!   the tool's `tool.result`; a deny or a timeout is a tool error that says
//!   so (`session`).
//!
//! `docs/mcp.md` is the user's guide.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

mod agents;
mod auth;
mod http;
mod policies;
mod session;
mod tools;

pub use auth::{Caller, Tokens};

/// Why the gateway could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listen address could not be bound.
    #[error(
        "listening on `{addr}`: {source} (another process on the port? pick one with --listen)"
    )]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The policy set could not be loaded.
    #[error("policy set in `{}`: {source}", dir.display())]
    Policies {
        /// The directory.
        dir: PathBuf,
        /// What the engine said.
        source: policy_engine::LoadError,
    },
    /// The policy directory could not be watched.
    #[error("watching `{}` for policy changes: {source}", dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// The watcher's error.
        source: notify::Error,
    },
    /// The token file is unreadable.
    #[error(transparent)]
    Tokens(#[from] broker_config::mcp_tokens::TokenFileError),
    /// The health server, the metrics or the ready file could not start.
    #[error(transparent)]
    Start(#[from] telemetry::service::StartError),
}

/// Where the gateway listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8790";
/// The HTTP path of the MCP endpoint.
pub const MCP_PATH: &str = "/mcp";
/// Default token file (written by `meshctl agents mcp-token`).
pub const DEFAULT_TOKENS_FILE: &str = ".agentmesh/auth/mcp-tokens.json";
/// Default directory of the agents' seeds (`<id>.nk`, `meshctl agents add`).
pub const DEFAULT_AGENT_KEYS_DIR: &str = ".agentmesh/auth/agents";
/// Default policy directory.
pub const DEFAULT_POLICIES: &str = "policies";
/// Default wait for a tool's result, in milliseconds.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 30_000;
/// Default largest request body, in bytes (an event is at most 1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The agent an unauthenticated client acts as under `--insecure`.
pub const DEFAULT_INSECURE_AGENT: &str = "mcp-client";

/// Everything the gateway runs with: the `mcp-gateway` flags (and the
/// environment variables named), or [`Config::default`] and struct update
/// syntax in tests.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mcp-gateway",
    version,
    about = "Serves the mesh's tools to MCP clients (Streamable HTTP), every call a tool.call through the policy worker"
)]
pub struct Config {
    /// NATS server URL, or the URLs of a cluster's nodes separated by commas.
    /// The gateway connects as each calling agent, with that agent's key.
    #[arg(long, env = "NATS_URL", default_value = broker_config::DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// Address the MCP endpoint (`/mcp`) listens on.
    #[arg(long, env = "MCP_GATEWAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Token file: agent id → SHA-256 of its bearer token (`meshctl agents mcp-token`).
    #[arg(long, env = "MCP_GATEWAY_TOKENS_FILE", default_value = DEFAULT_TOKENS_FILE)]
    pub tokens_file: PathBuf,
    /// Directory of the agents' nkey seeds (`<agent>.nk`): the gateway connects as the caller with its key.
    #[arg(long, env = "MCP_GATEWAY_AGENT_KEYS_DIR", default_value = DEFAULT_AGENT_KEYS_DIR)]
    pub agent_keys_dir: PathBuf,
    /// Policy directory (the worker's): `tools/list` shows only what it lets the caller call.
    #[arg(long, env = "AGENTMESH_POLICIES", default_value = DEFAULT_POLICIES)]
    pub policies: PathBuf,
    /// Milliseconds to wait for a tool's result before the call fails as timed out.
    #[arg(long, env = "MCP_GATEWAY_CALL_TIMEOUT_MS", default_value_t = DEFAULT_CALL_TIMEOUT_MS)]
    pub call_timeout_ms: u64,
    /// Largest request body in bytes; a larger one is refused with 413.
    #[arg(long, env = "MCP_GATEWAY_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// `Host` values accepted (DNS-rebinding protection), comma-separated; `*` accepts any. Default: loopback names.
    #[arg(long, env = "MCP_GATEWAY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Accept clients without a token (they act as --insecure-agent) and connect to NATS without keys.
    #[arg(long, env = "MCP_GATEWAY_INSECURE")]
    pub insecure: bool,
    /// The agent a client without a token acts as under --insecure.
    #[arg(long, env = "MCP_GATEWAY_INSECURE_AGENT", default_value = DEFAULT_INSECURE_AGENT)]
    pub insecure_agent: String,
    /// File created once the gateway serves, removed on exit.
    #[arg(long, env = "MCP_GATEWAY_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Health and metrics server, log format, OTLP export.
    #[command(flatten)]
    pub ops: telemetry::OpsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: broker_config::DEFAULT_NATS_URL.to_owned(),
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8790))),
            tokens_file: PathBuf::from(DEFAULT_TOKENS_FILE),
            agent_keys_dir: PathBuf::from(DEFAULT_AGENT_KEYS_DIR),
            policies: PathBuf::from(DEFAULT_POLICIES),
            call_timeout_ms: DEFAULT_CALL_TIMEOUT_MS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            allowed_hosts: Vec::new(),
            insecure: false,
            insecure_agent: DEFAULT_INSECURE_AGENT.to_owned(),
            ready_file: None,
            ops: telemetry::OpsConfig::default(),
        }
    }
}

impl Config {
    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms.max(1))
    }
}

/// What the running gateway tells its caller: where it listens.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// The bound address of the MCP endpoint (useful with port 0).
    pub addr: SocketAddr,
}

/// Binds the listener and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    run_with(config, shutdown, |_| {}).await
}

/// [`run`], telling `on_ready` where it listens once it serves.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Running),
) -> Result<(), Error> {
    // First, so /healthz answers while the gateway starts.
    let mut service = telemetry::service::Service::start("mcp-gateway", &config.ops).await?;
    let tokens = Tokens::open(config.tokens_file.clone())?;
    if config.insecure {
        tracing::warn!(
            agent = %config.insecure_agent,
            "--insecure: clients without a token act as this agent."
        );
    }
    let policies = policies::Policies::load(config.policies.clone())?;
    let _reloader = policies.watch(shutdown.clone())?;
    let pool = agents::Pool::new(
        config.nats_url.clone(),
        config.agent_keys_dir.clone(),
        config.insecure,
        config.call_timeout(),
        shutdown.clone(),
    );
    let metrics = telemetry::McpMetrics::new(service.metrics());
    let gateway = Arc::new(session::Gateway {
        pool,
        policies,
        call_timeout: config.call_timeout(),
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: config.listen,
        source,
    })?;
    let auth = auth::Auth {
        tokens,
        insecure_agent: config.insecure.then(|| config.insecure_agent.clone()),
    };
    let mcp = http::mcp_service(gateway, &config, shutdown.clone());
    service.ready(config.ready_file.as_deref())?;
    service.health().flag("serving", true);
    tracing::info!(%addr, path = MCP_PATH, "MCP gateway serving.");
    on_ready(Running { addr });
    http::serve(
        listener,
        mcp,
        Arc::new(auth),
        http::Limits {
            max_body_bytes: config.max_body_bytes,
            metrics,
        },
        shutdown,
    )
    .await;
    service.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn the_flags_default_to_the_named_constants_and_parse() {
        let parsed = Config::try_parse_from(["mcp-gateway"]).unwrap();
        let default = Config::default();
        assert_eq!(parsed.listen, default.listen);
        assert_eq!(parsed.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(parsed.tokens_file, default.tokens_file);
        assert_eq!(parsed.agent_keys_dir, default.agent_keys_dir);
        assert_eq!(parsed.policies, default.policies);
        assert_eq!(parsed.call_timeout_ms, DEFAULT_CALL_TIMEOUT_MS);
        assert_eq!(parsed.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(parsed.insecure_agent, DEFAULT_INSECURE_AGENT);
        assert!(!parsed.insecure && parsed.allowed_hosts.is_empty());

        let parsed = Config::try_parse_from([
            "mcp-gateway",
            "--listen",
            "0.0.0.0:9000",
            "--allowed-hosts",
            "mcp.example.com,localhost",
            "--insecure",
            "--call-timeout-ms",
            "1500",
        ])
        .unwrap();
        assert_eq!(parsed.listen.port(), 9000);
        assert_eq!(parsed.allowed_hosts, ["mcp.example.com", "localhost"]);
        assert!(parsed.insecure);
        assert_eq!(parsed.call_timeout(), Duration::from_millis(1500));
        let err = Config::try_parse_from(["mcp-gateway", "--listen", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen"), "{err}");
    }
}

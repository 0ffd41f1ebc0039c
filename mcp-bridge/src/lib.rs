//! `mcp-bridge`: one or more MCP servers as one mesh tool agent
//! (`docs/mcp.md`, "Bridging MCP servers").
//!
//! At start the bridge starts or connects every server (`server`: stdio
//! command or Streamable HTTP URL, through `rmcp`), lists their tools and
//! registers the agent the operator named with those tools in its card
//! (name, description, input schema), so callers find them and the policy
//! worker checks their arguments. Each `tool.call` the mesh delivers is
//! then a `tools/call` on the server that listed the tool; its result is
//! the `tool.result`, and an MCP error, a crash or a timeout is a tool
//! error that says which. Policies name the tools as `Tool::"<name>"`, like
//! any other.
//!
//! `main.rs` only parses flags into a [`Config`], starts logging and calls
//! [`run`]; tests start the same `run` in-process.

mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agents_sdk::{Agent, Delivery, EventType, ToolCall, ToolError, ToolSpec};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use server::{Endpoint, Server, ServerError, result_value};

/// Default NATS URL.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default deadline of one MCP request, in seconds.
pub const DEFAULT_CALL_TIMEOUT_SECS: u64 = 30;
/// Default deadline of starting (or connecting to) a server, in seconds.
pub const DEFAULT_START_TIMEOUT_SECS: u64 = 60;

/// The `mcp-bridge` flags (or [`Config::default`] and struct update
/// syntax in tests).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mcp-bridge",
    version,
    about = "Runs MCP servers (stdio or Streamable HTTP) as one agentmesh tool agent"
)]
pub struct Config {
    /// The agent id the tools are served under (register it with `meshctl agents add <id>`; policies name its tools as `Tool::"<name>"`).
    #[arg(long)]
    pub agent_id: String,
    /// An MCP server to run, as a command line speaking MCP over stdio (run with `sh -c 'exec <command>'`); repeatable.
    #[arg(long = "stdio", value_name = "COMMAND")]
    pub stdio: Vec<String>,
    /// An MCP server to reach over Streamable HTTP, e.g. `http://127.0.0.1:8000/mcp`; repeatable.
    #[arg(long = "http", value_name = "URL")]
    pub http: Vec<String>,
    /// Put before every tool name in the mesh (e.g. `fs.`), when the servers' names could clash with other agents' tools.
    #[arg(long, default_value = "")]
    pub tool_prefix: String,
    /// Seconds one MCP request (list, call) may take before it is an error.
    #[arg(long, env = "AGENTMESH_MCP_CALL_TIMEOUT_SECS", default_value_t = DEFAULT_CALL_TIMEOUT_SECS)]
    pub call_timeout_secs: u64,
    /// Seconds starting a server (or connecting to it) and its MCP handshake may take.
    #[arg(long, env = "AGENTMESH_MCP_START_TIMEOUT_SECS", default_value_t = DEFAULT_START_TIMEOUT_SECS)]
    pub start_timeout_secs: u64,
    /// The agent card's description (default: the servers bridged).
    #[arg(long)]
    pub description: Option<String>,
    /// NATS URL.
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// The agent's key file (`meshctl agents add` writes it); also read from `AGENTMESH_NKEY_FILE`.
    #[arg(long, value_name = "PATH")]
    pub nkey_file: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            agent_id: String::new(),
            stdio: Vec::new(),
            http: Vec::new(),
            tool_prefix: String::new(),
            call_timeout_secs: DEFAULT_CALL_TIMEOUT_SECS,
            start_timeout_secs: DEFAULT_START_TIMEOUT_SECS,
            description: None,
            nats_url: DEFAULT_NATS_URL.to_owned(),
            nkey_file: None,
        }
    }
}

impl Config {
    /// The servers, stdio first, in the order given.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.stdio
            .iter()
            .cloned()
            .map(Endpoint::Stdio)
            .chain(self.http.iter().cloned().map(Endpoint::Http))
            .collect()
    }

    /// The deadline of one MCP request (at least 1 s).
    pub fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.call_timeout_secs.max(1))
    }

    /// The deadline of starting a server and its handshake (at least 1 s).
    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.start_timeout_secs.max(1))
    }
}

/// Why the bridge could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No server was given.
    #[error("no MCP server to bridge: pass `--stdio '<command>'` or `--http <url>` (repeatable)")]
    NoServers,
    /// A server could not be started, reached or listed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Two servers list the same tool name.
    #[error(
        "the tool `{tool}` is listed by both MCP servers {first} and {second}: bridge them under different agent ids, or give each its own `--tool-prefix` in its own bridge"
    )]
    Clash {
        /// The mesh tool name.
        tool: String,
        /// The first server that lists it.
        first: Endpoint,
        /// The second.
        second: Endpoint,
    },
    /// The agent could not connect or register.
    #[error(transparent)]
    Connect(#[from] agents_sdk::ConnectError),
    /// The agent stopped serving.
    #[error("serving the mesh's tool calls failed: {0}")]
    Serve(String),
}

/// Where a mesh tool name goes: the server that lists it and its MCP name.
#[derive(Clone)]
struct Route {
    server: Arc<Server>,
    mcp_name: String,
}

/// One bridged tool: its route and its card entry.
struct Bridged {
    route: Route,
    spec: ToolSpec,
}

/// The routes of the tools the card lists, replaced when the servers' tools
/// change.
type Routes = Arc<RwLock<BTreeMap<String, Route>>>;

/// Lists every server's tools under their mesh names (`prefix` + the MCP
/// name); a name listed twice is an error.
async fn list(servers: &[Arc<Server>], prefix: &str) -> Result<BTreeMap<String, Bridged>, Error> {
    let mut tools: BTreeMap<String, Bridged> = BTreeMap::new();
    for server in servers {
        for tool in server.tools().await? {
            let name = format!("{prefix}{}", tool.name);
            if let Some(first) = tools.get(&name) {
                return Err(Error::Clash {
                    tool: name,
                    first: first.route.server.endpoint().clone(),
                    second: server.endpoint().clone(),
                });
            }
            let spec = ToolSpec::new(name.clone())
                .description(tool.description.as_deref().unwrap_or_default())
                .input_schema(Value::Object((*tool.input_schema).clone()));
            let route = Route {
                server: server.clone(),
                mcp_name: tool.name.into_owned(),
            };
            tools.insert(name, Bridged { route, spec });
        }
    }
    Ok(tools)
}

/// Calls the mesh tool `tool` on the server that lists it now.
async fn call(routes: &Routes, tool: &str, arguments: &Value) -> Result<Value, ToolError> {
    let route = routes
        .read()
        .map_err(|_| ToolError::new("the bridge's tool table is poisoned"))?
        .get(tool)
        .cloned();
    match route {
        Some(route) => route.server.call(&route.mcp_name, arguments).await,
        None => Err(ToolError::new(format!(
            "no MCP server bridged here lists the tool `{tool}` (any more)"
        ))),
    }
}

/// Starts every server, lists their tools into the agent's card, and serves
/// the mesh's calls of them until `shutdown`. When a server's tools change
/// (`notifications/tools/list_changed`), they are listed again and the card
/// in `mesh-agents` is written again with the new list.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let endpoints = config.endpoints();
    if endpoints.is_empty() {
        return Err(Error::NoServers);
    }
    let changed = Arc::new(Notify::new());
    let servers = endpoints
        .into_iter()
        .map(|endpoint| {
            Server::new(endpoint, config.call_timeout(), config.start_timeout())
                .map(|server| Arc::new(server.with_tools_changed(changed.clone())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let listed = list(&servers, &config.tool_prefix).await?;
    let routes: Routes = Arc::new(RwLock::new(
        listed
            .iter()
            .map(|(name, bridged)| (name.clone(), bridged.route.clone()))
            .collect(),
    ));
    let description = config.description.clone().unwrap_or_else(|| {
        let list: Vec<String> = servers.iter().map(|s| s.endpoint().to_string()).collect();
        format!("MCP servers bridged into the mesh: {}", list.join(", "))
    });
    let mut builder = Agent::builder(config.agent_id.clone())
        .description(description)
        // Tools listed after the start are answered by `serve_with`'s
        // handler: as many at once as the registered ones.
        .max_concurrent_deliveries(MAX_CONCURRENT_LATER_TOOLS);
    if let Some(path) = &config.nkey_file {
        builder = builder.nkey_file(path);
    }
    for (name, bridged) in listed {
        tracing::info!(tool = %name, server = %bridged.route.server.endpoint(), "Bridging an MCP tool.");
        let routes = routes.clone();
        builder = builder.tool(bridged.spec, move |tool_call: ToolCall| {
            let routes = routes.clone();
            let name = name.clone();
            async move { call(&routes, &name, tool_call.arguments()).await }
        });
    }
    let agent = builder.connect(&config.nats_url).await?;
    tracing::info!(agent = %agent.id(), tools = agent.card().tools.len(), "MCP bridge serving.");
    let relisting = shutdown.child_token();
    let relister = tokio::spawn(relist(
        agent.clone(),
        servers.clone(),
        config.tool_prefix.clone(),
        routes.clone(),
        changed,
        relisting.clone(),
    ));
    let served = agent
        .serve_with(shutdown.cancelled_owned(), |delivery: Delivery| {
            let routes = routes.clone();
            async move { answer(&routes, delivery).await }
        })
        .await;
    relisting.cancel();
    let _ = relister.await;
    for server in &servers {
        server.close().await;
    }
    let _ = agent.close().await;
    served.map_err(|e| Error::Serve(e.to_string()))
}

/// How many calls of tools listed after the start run at once.
const MAX_CONCURRENT_LATER_TOOLS: usize = 16;

/// A delivery the SDK did not answer itself: a call of a tool a server
/// listed after the start is answered from `routes`; anything else is
/// acknowledged.
async fn answer(routes: &Routes, delivery: Delivery) -> Result<(), agents_sdk::PublishError> {
    if delivery.event_type() != EventType::ToolCall {
        tracing::info!(id = delivery.id(), r#type = %delivery.event_type(), from = %delivery.sender(), "Not a tool call; acknowledging it.");
        return Ok(());
    }
    let tool = delivery.subject().unwrap_or_default().to_owned();
    // The SDK's shape (`{"tool", "arguments"}`), or bare arguments.
    let arguments = match delivery.json::<Value>() {
        Ok(Value::Object(mut map)) if map.contains_key("arguments") => {
            map.remove("arguments").unwrap_or(Value::Null)
        }
        Ok(other) => other,
        Err(_) => Value::Null,
    };
    let result = call(routes, &tool, &arguments).await;
    delivery.answer_tool(result).await.map(|_| ())
}

/// Lists the servers' tools again each time one says they changed, and
/// writes the agent's card with the new list (the routes first, so a
/// caller that read the new card finds its tool). A listing that fails
/// keeps the previous card.
async fn relist(
    agent: Agent,
    servers: Vec<Arc<Server>>,
    prefix: String,
    routes: Routes,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut card = agent.card().clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = changed.notified() => {}
        }
        let listed = match list(&servers, &prefix).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "Could not list the MCP servers' tools again; the card keeps the previous list.");
                continue;
            }
        };
        let specs: Vec<ToolSpec> = listed.values().map(|b| b.spec.clone()).collect();
        if specs == card.tools {
            continue;
        }
        if let Ok(mut current) = routes.write() {
            *current = listed
                .into_iter()
                .map(|(name, bridged)| (name, bridged.route))
                .collect();
        }
        card.tools = specs;
        match agent.directory().register(&card).await {
            Ok(_) => {
                let names: Vec<&str> = card.tools.iter().map(|t| t.name.as_str()).collect();
                tracing::info!(agent = %agent.id(), tools = ?names, "The MCP servers' tools changed; the card lists them.");
            }
            Err(e) => {
                tracing::warn!(error = %e, "Could not write the agent's card with the new tools.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_keep_their_names_and_defaults_match_default() {
        let config = Config::try_parse_from([
            "mcp-bridge",
            "--agent-id",
            "files",
            "--stdio",
            "python3 server.py",
            "--http",
            "http://127.0.0.1:8000/mcp",
            "--stdio",
            "other",
            "--tool-prefix",
            "fs.",
            "--call-timeout-secs",
            "0",
            "--start-timeout-secs",
            "5",
        ])
        .unwrap();
        assert_eq!(config.agent_id, "files");
        assert_eq!(
            config.endpoints(),
            [
                Endpoint::Stdio("python3 server.py".into()),
                Endpoint::Stdio("other".into()),
                Endpoint::Http("http://127.0.0.1:8000/mcp".into()),
            ]
        );
        assert_eq!(config.tool_prefix, "fs.");
        assert_eq!(
            config.call_timeout(),
            Duration::from_secs(1),
            "at least 1 s"
        );
        let plain = Config::try_parse_from(["mcp-bridge", "--agent-id", "a"]).unwrap();
        if std::env::var_os("AGENTMESH_MCP_CALL_TIMEOUT_SECS").is_none() {
            assert_eq!(plain.call_timeout_secs, Config::default().call_timeout_secs);
        }
        if std::env::var_os("AGENTMESH_MCP_START_TIMEOUT_SECS").is_none() {
            assert_eq!(
                plain.start_timeout_secs,
                Config::default().start_timeout_secs
            );
        }
        if std::env::var_os("NATS_URL").is_none() {
            assert_eq!(plain.nats_url, Config::default().nats_url);
        }
        assert!(
            Config::try_parse_from(["mcp-bridge"]).is_err(),
            "the agent id is required"
        );
    }

    #[tokio::test]
    async fn without_servers_it_says_how_to_name_one() {
        let config = Config {
            agent_id: "a".into(),
            ..Default::default()
        };
        let e = run(config, CancellationToken::new()).await.unwrap_err();
        assert!(e.to_string().contains("--stdio"), "{e}");
    }
}

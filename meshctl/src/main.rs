//! `meshctl`: the operator CLI of agentmesh — the local stack (`up`, `down`,
//! `status`), agent identities (`agents`), the demo workflow and decision
//! trees from ClickHouse (`trace`, and the web view `ui`), and the
//! guardrails (`policy`, `approvals`, `limits`), and the tool-result cache
//! (`cache`).

// Everything meshctl prints goes through `out!` / `outln!` (or
// `output::stdout()`): `print!` and `println!` panic when the reader of a
// pipe has gone (`meshctl … | head -1`).
#![deny(clippy::print_stdout, clippy::print_stderr)]

/// `print!` for meshctl: a closed stdout ends meshctl quietly
/// ([`output::write_out`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!($($arg)*))
    };
}

/// `println!` for meshctl: a closed stdout ends meshctl quietly
/// ([`output::write_out`]).
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` for meshctl: a closed stderr is no panic
/// ([`output::write_err`]).
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod agents;
mod approvals;
mod audit;
mod cache;
mod demo;
mod entities;
mod exit;
mod gpus;
mod identity;
mod limits;
mod output;
mod policy;
mod prove;
mod publish;
mod reference;
mod signers;
mod stack;
mod tail;
mod tree;
mod ui;

use stack::{procs, servers};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Runs and inspects an agentmesh stack.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    /// NATS server URL, or a cluster's node URLs separated by commas (a local server, or with `up --nats-nodes 3` a local cluster, is started by `up` when nothing answers here).
    #[arg(long, global = true, env = "NATS_URL", default_value = broker_config::DEFAULT_NATS_URL, value_parser = parse_nats_url)]
    nats_url: String,
    /// ClickHouse HTTP URL (a local one is started by `up` when nothing answers here).
    #[arg(long, global = true, env = "CLICKHOUSE_URL", default_value = audit_tables::DEFAULT_CLICKHOUSE_URL, value_parser = parse_http_url)]
    clickhouse_url: String,
    /// ClickHouse user.
    #[arg(
        long,
        global = true,
        env = "CLICKHOUSE_USER",
        default_value = "default"
    )]
    clickhouse_user: String,
    /// ClickHouse password.
    #[arg(
        long,
        global = true,
        env = "CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    clickhouse_password: String,
    /// Database of the audit tables.
    #[arg(long, global = true, env = "AGENTMESH_AUDIT_DATABASE", default_value = audit_tables::schema::DEFAULT_DATABASE)]
    database: String,
    /// NATS nkey seed file meshctl connects with (default: the operator key of a stack with authorization, `.agentmesh/auth/keys/meshctl.nk`).
    #[arg(long, global = true, env = "NATS_NKEY_SEED_FILE")]
    nats_nkey_seed_file: Option<PathBuf>,
    /// NATS `.creds` file meshctl connects with (servers in operator mode).
    #[arg(
        long,
        global = true,
        env = "NATS_CREDS",
        conflicts_with = "nats_nkey_seed_file"
    )]
    nats_creds: Option<PathBuf>,
    /// State directory: server data, logs, pid files.
    #[arg(
        long,
        global = true,
        env = "AGENTMESH_HOME",
        default_value = ".agentmesh"
    )]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start what is missing of the local stack: nats-server, clickhouse-server, policy-worker, audit-sink, gpu-scaler.
    Up {
        /// Return once everything is ready and leave it running (stop it with `meshctl down`).
        #[arg(long)]
        detach: bool,
        /// Policy directory for the policy worker.
        #[arg(long, env = "AGENTMESH_POLICIES", default_value = "policies")]
        policies: PathBuf,
        /// Do not start this service (repeatable).
        #[arg(long, value_name = "SERVICE", value_parser = clap::builder::PossibleValuesParser::new(stack::SERVICES))]
        without: Vec<String>,
        /// How long to wait for every component to be ready (e.g. `60s`, `2m`).
        #[arg(long, alias = "timeout-secs", default_value = "60s", value_parser = output::parse_duration)]
        timeout: Duration,
        /// Pool config for the GPU scaler (skipped when the file does not exist).
        #[arg(
            long,
            env = "GPU_SCALER_CONFIG",
            default_value = "gpu-scaler/examples/pools.toml"
        )]
        gpu_config: PathBuf,
        /// Run NATS and ClickHouse without authorization: any client may connect and publish on any subject (development only).
        #[arg(long)]
        insecure: bool,
        /// NATS nodes to start: 1, or 3 for a local JetStream cluster (ports NATS_URL's port +0..2, routes +2000, monitoring +4000; streams at 3 replicas).
        #[arg(long, default_value = "1", value_parser = parse_nats_nodes)]
        nats_nodes: usize,
        /// Run this many ClickHouse replicas of one shard (2 or 3; with ZooKeeper: `scripts/install-deps.sh --replicated`) instead of one server: the audit tables replicated, the audit sink failing over between them.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        clickhouse_replicas: u8,
        /// How the NATS nodes `up` starts store an event before acknowledging it: `always` fsyncs every write (an acknowledged event survives an OS crash or power cut of the node; needs nats-server 2.10+), `interval` flushes every 2 minutes (faster; a process kill loses nothing, an OS crash or power cut loses up to the last 2 minutes).
        #[arg(long, env = "AGENTMESH_DURABILITY", value_enum, default_value_t = broker_config::server::Durability::Always)]
        durability: broker_config::server::Durability,
        /// Days events are kept in the `MESH_*` streams (`max_age`; `MESH_AUDIT` is kept for good), given to every service too. Unset: streams keep what they have (7 days when created).
        #[arg(long, env = "AGENTMESH_STREAM_MAX_AGE_DAYS")]
        stream_max_age_days: Option<u64>,
    },
    /// Agent identities: nkeys, broker permissions and Cedar entities.
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Stop what `meshctl up` started.
    Down,
    /// Show each component, stream depths and rows per audit table.
    Status {
        #[command(flatten)]
        output: output::OutputArg,
    },
    /// Run the planner → coder → reviewer demo and print its decision tree from ClickHouse.
    Demo {
        /// How long to wait for every step and decision to reach ClickHouse (e.g. `60s`, `2m`).
        #[arg(long, alias = "timeout-secs", default_value = "60s", value_parser = output::parse_duration)]
        timeout: Duration,
    },
    /// Print the decision tree of a workflow from ClickHouse.
    Trace {
        /// The workflow's trace id (32 hex characters).
        trace_id: String,
        /// How long to wait for the trace's steps and their decisions to reach ClickHouse (the audit sink writes them in batches, within about a second); then it draws what is there. `0s` answers at once.
        #[arg(long, default_value = "10s", value_parser = output::parse_duration)]
        wait: Duration,
        #[command(flatten)]
        output: output::OutputArg,
    },
    /// Serve a web view of the audit: recent traces, decision trees (live), denials.
    Ui {
        /// Port to serve on (0: any free port).
        #[arg(long, env = "AGENTMESH_UI_PORT", default_value_t = 8080)]
        port: u16,
        /// Address to bind; the default keeps the UI on this machine.
        #[arg(long, env = "AGENTMESH_UI_BIND", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        bind: IpAddr,
    },
    /// Check, promote (shadow → active) and replay policy sets.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// List, approve and reject events waiting for a human approval.
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalsCommand,
    },
    /// Show and reset the rate and budget counters.
    Limits {
        #[command(subcommand)]
        command: limits::LimitsCommand,
    },
    /// Show and purge the tool-result cache (mesh-tool-cache).
    Cache {
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// Trusted decision signers (mesh-signers): list, add, retire, revoke, rotate.
    Signers {
        #[command(subcommand)]
        command: signers::SignersCommand,
    },
    /// Verify the audit: decisions in ClickHouse against their signatures and the signed checkpoints on MESH_AUDIT.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Publish one CloudEvent as a registered agent, with its key, and print the worker's receipt.
    Pub(publish::PubArgs),
    /// Follow receipts, deliveries or dead letters live (an ordered consumer of its own: agents' durables are left alone).
    Tail(tail::TailArgs),
    /// Print a shell completion script (e.g. `meshctl completions bash > ~/.local/share/bash-completion/completions/meshctl`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Generated documentation: `meshctl docs reference` prints docs/meshctl.md.
    #[command(hide = true)]
    Docs {
        #[command(subcommand)]
        command: DocsCommand,
    },
    /// GPU inventory, leases and per-pool demand.
    Gpus {
        /// The GPU scaler's pool config, for each pool's demand when no scaler answers.
        #[arg(long, env = "GPU_SCALER_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        output: output::OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum DocsCommand {
    /// The reference of every command and flag (docs/meshctl.md), from these definitions.
    Reference,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Register an agent: a new nkey (seed in `.agentmesh/auth/agents/<id>.nk`), broker permissions for its own subjects, a Cedar entity with its role; reloads the running nats-server.
    Add {
        /// The agent id (`[a-z0-9][a-z0-9_-]{0,62}`).
        id: String,
        /// Its role: a `Role` entity of entities.json (e.g. orchestrator, worker, reviewer).
        #[arg(long)]
        role: String,
        /// An entity attribute, KEY=VALUE (repeatable; the shipped schema needs `team`).
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
        /// Policy directory whose entities.json gets the agent.
        #[arg(long, env = "AGENTMESH_POLICIES", default_value = "policies")]
        policies: PathBuf,
        /// Also issue a bearer token for MCP clients of the MCP gateway (`meshctl agents mcp-token`).
        #[arg(long)]
        mcp_token: bool,
    },
    /// Issue a new bearer token with which an MCP client calls the mesh's tools through the MCP gateway as this agent (docs/mcp.md); the old token stops working.
    McpToken {
        /// The agent id (registered with `meshctl agents add`).
        id: String,
        #[command(flatten)]
        output: output::OutputArg,
    },
    /// Revoke an agent: its key (open connections are closed), its entity, its durable consumer and its card.
    Remove {
        /// The agent id.
        id: String,
        /// Policy directory whose entities.json loses the agent.
        #[arg(long, env = "AGENTMESH_POLICIES", default_value = "policies")]
        policies: PathBuf,
    },
    /// Give an agent a new key: the old one is refused and its connections closed; entity, consumer and card stay.
    Rotate {
        /// The agent id.
        id: String,
    },
    /// List agents: role, whether entities.json has them, key and seed file.
    List {
        /// Policy directory to read entities.json from.
        #[arg(long, env = "AGENTMESH_POLICIES", default_value = "policies")]
        policies: PathBuf,
        #[command(flatten)]
        output: output::OutputArg,
    },
}

/// meshctl's log filter unless `RUST_LOG` says otherwise. async-nats logs
/// every refused connection attempt as an `ERROR` (`authorization
/// violation`), also from the tasks it spawns to reconnect and when it
/// gives up (`connection closed`): `agents add|rotate|remove` probe keys
/// the broker is about to accept or refuse, and a connection that meshctl
/// needs and loses ends the command with meshctl's own one line.
const DEFAULT_LOG: &str = "warn,async_nats=off";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        // `up` or `down` finished after its stdout was closed.
        Ok(_) if output::stdout_closed() => ExitCode::from(output::STDOUT_CLOSED),
        Ok(code) => code,
        Err(e) => {
            let code = exit::classify(&e);
            errln!("meshctl: {}", exit::line(&e, code));
            code.into()
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "meshctl", &mut output::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Docs {
            command: DocsCommand::Reference,
        } => {
            let command = <Cli as clap::CommandFactory>::command();
            out!("{}", reference::markdown(&command));
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    audit_tables::schema::check_database(&cli.database)
        .map_err(|e| exit::fail(exit::Exit::Usage, format!("--database: {e:#}")))?;
    let home = procs::Home::new(cli.home.clone());
    let endpoints = endpoints(&cli, &home)?;
    match cli.command {
        Command::Up {
            detach,
            policies,
            without,
            gpu_config,
            timeout,
            insecure,
            nats_nodes,
            clickhouse_replicas,
            durability,
            stream_max_age_days,
        } => {
            let options = stack::UpOptions {
                detach,
                policies,
                without,
                timeout,
                gpu_config: Some(gpu_config),
                insecure,
                nats_nodes,
                clickhouse_replicas: usize::from(clickhouse_replicas),
                durability,
                stream_max_age_days,
            };
            stack::up(&home, &endpoints, &options).await?;
        }
        Command::Down => stack::down(&home)?,
        Command::Status { output } => {
            if !stack::status(&home, &endpoints, output.json()).await? {
                return exit(false);
            }
        }
        Command::Agents { command } => match command {
            AgentsCommand::Add {
                id,
                role,
                attrs,
                policies,
                mcp_token,
            } => {
                agents::add(&home, &endpoints, &policies, &id, &role, &attrs).await?;
                if mcp_token {
                    agents::mcp_token(&home, &id, false)?;
                }
            }
            AgentsCommand::McpToken { id, output } => agents::mcp_token(&home, &id, output.json())?,
            AgentsCommand::Remove { id, policies } => {
                agents::remove(&home, &endpoints, &policies, &id).await?
            }
            AgentsCommand::Rotate { id } => agents::rotate(&home, &endpoints, &id).await?,
            AgentsCommand::List { policies, output } => {
                agents::list(&home, &policies, output.json())?
            }
        },
        Command::Demo { timeout } => demo::run(&home, &endpoints, timeout).await?,
        Command::Gpus { config, output } => {
            gpus::run(&endpoints, config.as_deref(), output.json()).await?
        }
        Command::Trace {
            trace_id,
            wait,
            output,
        } => tree::print(&endpoints, &trace_id, wait, output.json()).await?,
        Command::Ui { port, bind } => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
            ui::run(&endpoints, SocketAddr::new(bind, port), shutdown).await?
        }
        Command::Policy { command } => return exit(policy::run(command, &endpoints).await?),
        Command::Approvals { command } => {
            return exit(approvals::run(command, &endpoints).await?);
        }
        Command::Limits { command } => return exit(limits::run(command, &endpoints).await?),
        Command::Cache { command } => return exit(cache::run(command, &endpoints).await?),
        Command::Signers { command } => {
            return exit(signers::run(command, &home, &endpoints).await?);
        }
        Command::Audit { command } => return exit(audit::run(command, &endpoints).await?),
        Command::Completions { .. } | Command::Docs { .. } => {}
        Command::Pub(args) => return Ok(publish::run(&home, &endpoints, args).await?.into()),
        Command::Tail(args) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
            return Ok(tail::run(&home, &endpoints, args, shutdown).await?.into());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the servers are and how to reach them: the flags, completed with
/// the local stack's credentials and, except for `up` (which decides it),
/// its cluster's node URLs.
fn endpoints(cli: &Cli, home: &procs::Home) -> anyhow::Result<servers::Endpoints> {
    let insecure = matches!(cli.command, Command::Up { insecure: true, .. });
    let endpoints = servers::Endpoints {
        nats_url: cli.nats_url.clone(),
        nats_credentials: broker_config::NatsCredentials {
            nkey_seed_file: cli.nats_nkey_seed_file.clone(),
            creds_file: cli.nats_creds.clone(),
        },
        clickhouse_url: cli.clickhouse_url.clone(),
        clickhouse_user: cli.clickhouse_user.clone(),
        clickhouse_password: cli.clickhouse_password.clone(),
        database: cli.database.clone(),
    };
    let is_up = matches!(cli.command, Command::Up { .. });
    let endpoints = endpoints.with_local_credentials(home, is_up, insecure);
    if is_up {
        Ok(endpoints)
    } else {
        endpoints.with_local_cluster(home)
    }
}

/// `--nats-url`, checked at parse time: one URL or a comma-separated list.
fn parse_nats_url(text: &str) -> Result<String, String> {
    schemas::servers::server_addrs(text)
        .map(|_| text.to_owned())
        .map_err(|e| {
            format!("{e}: write `nats://HOST:PORT`, or a cluster's nodes separated by commas")
        })
}

/// `--clickhouse-url`, checked at parse time: an `http(s)://` URL.
fn parse_http_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(text.to_owned()),
        _ => Err(format!(
            "`{text}` is not a ClickHouse HTTP URL: write `http://HOST:8123`"
        )),
    }
}

/// `--nats-nodes`: 1, or 3 for a local cluster.
fn parse_nats_nodes(text: &str) -> Result<usize, String> {
    match text {
        "1" => Ok(1),
        "3" => Ok(3),
        _ => Err(format!(
            "`{text}`: a local stack runs 1 NATS node or a cluster of 3 [possible values: 1, 3]"
        )),
    }
}

/// [`exit::Exit::Ok`] when `ok`, else [`exit::Exit::Findings`].
fn exit(ok: bool) -> anyhow::Result<ExitCode> {
    Ok(if ok {
        exit::Exit::Ok
    } else {
        exit::Exit::Findings
    }
    .into())
}

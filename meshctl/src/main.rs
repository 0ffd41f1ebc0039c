//! `meshctl`: the operator CLI of agentmesh — the local stack (`up`, `down`,
//! `status`), the demo workflow and decision trees from ClickHouse.

mod demo;
mod procs;
mod servers;
mod stack;
mod tree;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Runs and inspects an agentmesh stack.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    /// NATS server URL (a local one is started by `up` when nothing answers here).
    #[arg(long, global = true, env = "NATS_URL", default_value = audit_sink::DEFAULT_NATS_URL)]
    nats_url: String,
    /// ClickHouse HTTP URL (a local one is started by `up` when nothing answers here).
    #[arg(long, global = true, env = "CLICKHOUSE_URL", default_value = audit_sink::DEFAULT_CLICKHOUSE_URL)]
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
    #[arg(long, global = true, env = "AGENTMESH_AUDIT_DATABASE", default_value = audit_sink::schema::DEFAULT_DATABASE)]
    database: String,
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
        /// Do not start this service (repeatable): policy-worker, audit-sink or gpu-scaler.
        #[arg(long, value_name = "SERVICE")]
        without: Vec<String>,
        /// Seconds to wait for every component to be ready.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Stop what `meshctl up` started.
    Down,
    /// Show each component, stream depths and rows per audit table.
    Status,
    /// Run the planner → coder → reviewer demo and print its decision tree from ClickHouse.
    Demo {
        /// Seconds to wait for every step and decision to reach ClickHouse.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Print the decision tree of a workflow from ClickHouse.
    Trace {
        /// The workflow's trace id (32 hex characters).
        trace_id: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    audit_sink::schema::check_database(&cli.database)?;
    let home = procs::Home::new(cli.home);
    let endpoints = servers::Endpoints {
        nats_url: cli.nats_url,
        clickhouse_url: cli.clickhouse_url,
        clickhouse_user: cli.clickhouse_user,
        clickhouse_password: cli.clickhouse_password,
        database: cli.database,
    };
    match cli.command {
        Command::Up {
            detach,
            policies,
            without,
            timeout_secs,
        } => {
            let options = stack::UpOptions {
                detach,
                policies,
                without,
                timeout: Duration::from_secs(timeout_secs),
            };
            stack::up(&home, &endpoints, &options).await?;
        }
        Command::Down => stack::down(&home)?,
        Command::Status => {
            if !stack::status(&home, &endpoints).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Demo { timeout_secs } => {
            run_demo(&endpoints, Duration::from_secs(timeout_secs)).await?
        }
        Command::Trace { trace_id } => {
            tree::check_trace_id(&trace_id)?;
            let nodes = tree::fetch(&endpoints.audit_db(), &trace_id).await?;
            if nodes.is_empty() {
                anyhow::bail!(
                    "no steps of trace {trace_id} in `{}.events`",
                    endpoints.database
                );
            }
            print!("{}", tree::render(&trace_id, &nodes));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_demo(endpoints: &servers::Endpoints, timeout: Duration) -> anyhow::Result<()> {
    if servers::nats_state(&endpoints.nats_url).await != servers::NatsState::JetStream {
        anyhow::bail!(
            "no NATS server with JetStream answers at {}: start the stack with `meshctl up --detach`",
            endpoints.nats_url
        );
    }
    if servers::clickhouse_version(&endpoints.clickhouse())
        .await
        .is_none()
    {
        anyhow::bail!(
            "no ClickHouse answers at {}: start the stack with `meshctl up --detach`",
            endpoints.clickhouse_url
        );
    }
    let nats = async_nats::connect(&endpoints.nats_url).await?;
    let js = async_nats::jetstream::new(nats);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    demo::run(endpoints, timeout).await
}

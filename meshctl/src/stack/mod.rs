//! `meshctl up`, `down` and `status`: the local stack of `docs/contract.md`.
//!
//! `up` starts what is missing — nats-server (JetStream) and
//! clickhouse-server from `PATH`, data under `.agentmesh/` — applies the
//! streams and the audit schema, then runs policy-worker, audit-sink,
//! gpu-scaler and mcp-gateway (found next to `meshctl` first, then on `PATH`). Whatever it
//! starts gets a pid file, which is how `down` finds it again.
//!
//! Authorization is on unless `--insecure`: `up` gives the operator, every
//! service and every agent of the policy directory's `entities.json` an
//! nkey (`agents.rs`), starts nats-server with the config `broker-config`
//! renders from them (or reloads the one it started before), creates the
//! agents' and services' durable consumers, starts ClickHouse with a
//! password for `default`, an insert user for the sink and a read-only
//! user, and hands each service its own credentials.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, bail};
use policy_engine::SCHEMA_FILE;

use crate::entities;
use crate::identity::{AuthState, ClickHouseSecrets};
use crate::output;
use procs::{Home, Stopped};
use servers::Endpoints;

mod clickhouse;
pub(crate) mod nats;
pub(crate) mod procs;
pub(crate) mod replicas;
pub(crate) mod servers;
mod services;
mod status;

pub(crate) use status::status;

/// The services, in start order.
pub(crate) const SERVICES: [&str; 4] = ["policy-worker", "audit-sink", "gpu-scaler", "mcp-gateway"];
/// Services the stack runs without when they cannot start.
const OPTIONAL: [&str; 2] = ["gpu-scaler", "mcp-gateway"];
/// Everything `down` may stop, in stop order: services (the sink last, so
/// it flushes what the others produced), then the servers.
const STOP_ORDER: [&str; 11] = [
    "mcp-gateway",
    "gpu-scaler",
    "policy-worker",
    "audit-sink",
    "clickhouse-server",
    "clickhouse-server-2",
    "clickhouse-server-3",
    "zookeeper",
    "nats-server",
    "nats-server-2",
    "nats-server-3",
];

/// Options of `meshctl up`.
#[derive(Debug, Clone)]
pub(crate) struct UpOptions {
    /// Return once everything is ready, leaving it running.
    pub detach: bool,
    /// The policy directory for the worker.
    pub policies: PathBuf,
    /// Services not to start.
    pub without: Vec<String>,
    /// How long to wait for everything to be ready.
    pub timeout: Duration,
    /// The GPU scaler's pool config; without one the scaler leases nothing.
    pub gpu_config: Option<PathBuf>,
    /// Run without authorization (anyone may connect and publish anywhere).
    pub insecure: bool,
    /// ClickHouse replicas (with ZooKeeper) instead of one server when
    /// above 1; the sink gets every replica's URL.
    pub clickhouse_replicas: usize,
    /// NATS nodes to start when none answers: 1, or 3 for a local cluster
    /// whose streams and buckets have 3 replicas.
    pub nats_nodes: usize,
    /// Whether the NATS nodes this `up` starts fsync every write before
    /// acknowledging it.
    pub durability: broker_config::server::Durability,
    /// Days events are kept in the `MESH_*` streams; `None` keeps what
    /// existing streams have (7 days for new ones).
    pub stream_max_age_days: Option<u64>,
}

impl UpOptions {
    /// Replicas of every stream and bucket: 3 on a cluster, else 1.
    fn stream_replicas(&self) -> usize {
        if self.nats_nodes >= 3 { 3 } else { 1 }
    }
}

/// The file that records whether the running stack has authorization.
pub(crate) fn mode_file(home: &Home) -> PathBuf {
    home.run_dir().join("stack-mode")
}

/// Whether the last `meshctl up` here turned authorization on.
pub(crate) fn auth_mode(home: &Home) -> bool {
    std::fs::read_to_string(mode_file(home)).is_ok_and(|m| m.trim() == "auth")
}

/// What this `up` started (stopped again on failure or, in the foreground,
/// on Ctrl-C).
#[derive(Default)]
struct Started {
    children: Vec<(&'static str, Child)>,
}

impl Started {
    fn stop_all(&mut self, home: &Home) {
        for name in STOP_ORDER {
            if let Some(pos) = self.children.iter().position(|(n, _)| *n == name) {
                let (name, mut child) = self.children.remove(pos);
                match procs::stop(home, name, Duration::from_secs(15)) {
                    Ok(Some(Stopped::Killed)) => {
                        line(name, "killed", "did not stop within 15s of SIGTERM")
                    }
                    Ok(Some(Stopped::NotRunning)) => line(name, "exited", ""),
                    Ok(_) => line(name, "stopped", ""),
                    Err(e) => errln!("{name:<18} {e:#}"),
                }
                let _ = child.wait();
            }
        }
    }
}

fn line(name: &str, state: &str, detail: impl std::fmt::Display) {
    outln!("{name:<18} {state:<8} {detail}");
}

/// `meshctl up`.
pub(crate) async fn up(
    home: &Home,
    endpoints: &Endpoints,
    options: &UpOptions,
) -> anyhow::Result<()> {
    let policies = checked_options(options)?;
    // A reader that goes (`meshctl up | head -3`) must not leave a stack
    // half started, nor a foreground stack running without its `up`.
    output::finish_despite_closed_stdout();
    home.create()?;
    let mut endpoints = endpoints.clone();
    endpoints.nats_url = nats_url(home, &endpoints.nats_url, options.nats_nodes)?;
    servers::record_nodes(home, options.nats_nodes)?;
    let auth = if options.insecure {
        None
    } else {
        Some(set_up_identities(home, &mut endpoints, options)?)
    };
    std::fs::write(
        mode_file(home),
        if auth.is_some() {
            "auth\n"
        } else {
            "insecure\n"
        },
    )
    .with_context(|| format!("writing `{}`", mode_file(home).display()))?;
    let mut started = Started::default();
    match bring_up(
        home,
        &endpoints,
        options,
        policies,
        auth.as_ref(),
        &mut started,
    )
    .await
    {
        Ok(()) => {}
        Err(e) => {
            if !started.children.is_empty() {
                errln!("Start failed; stopping what this command started.");
                started.stop_all(home);
            }
            return Err(e);
        }
    }
    if options.detach {
        outln!("\nThe stack is up. `meshctl demo` runs the demo; `meshctl down` stops it.");
        // The children run on in their own process groups.
        return Ok(());
    }
    outln!("\nThe stack is up. Ctrl-C stops what this command started.");
    wait_in_foreground(home, &mut started).await;
    started.stop_all(home);
    Ok(())
}

/// Checks `up`'s options before anything starts; returns the policy
/// directory the worker loads (`None` without a worker).
fn checked_options(options: &UpOptions) -> anyhow::Result<Option<PathBuf>> {
    for name in &options.without {
        if !SERVICES.contains(&name.as_str()) {
            bail!(
                "--without `{name}`: not a service (one of {})",
                SERVICES.join(", ")
            );
        }
    }
    if !matches!(options.nats_nodes, 1 | 3) {
        bail!(
            "--nats-nodes {}: a local stack runs 1 NATS node or a cluster of 3",
            options.nats_nodes
        );
    }
    if options.without.iter().any(|w| w == "policy-worker") {
        return Ok(None);
    }
    let dir = &options.policies;
    if !dir.join(SCHEMA_FILE).is_file() {
        bail!(
            "policy directory `{}` has no `{SCHEMA_FILE}`: run meshctl from the repository root or pass --policies DIR",
            dir.display(),
        );
    }
    Ok(Some(std::fs::canonicalize(dir).with_context(|| {
        format!("resolving `{}`", dir.display())
    })?))
}

/// The NATS URL(s) of a stack of `nodes` nodes whose first node is at
/// `url`: `url` itself for one node, every node's URL for a cluster.
/// Refuses to change the node count of a stack that runs.
fn nats_url(home: &Home, url: &str, nodes: usize) -> anyhow::Result<String> {
    let running_nodes = servers::NATS_NODES
        .iter()
        .filter(|name| procs::read_pid(home, name).is_some_and(|r| procs::is_running(&r)))
        .count();
    if running_nodes > 0 && servers::recorded_nodes(home) != nodes {
        bail!(
            "the NATS of `meshctl up` runs {} node(s), not {nodes}: pass --nats-nodes {}, or stop it first (`meshctl down`)",
            servers::recorded_nodes(home),
            servers::recorded_nodes(home)
        );
    }
    if nodes == 1 {
        return Ok(url.to_owned());
    }
    let Some(port) = servers::loopback_port(url, 4222).filter(|_| !url.contains(',')) else {
        bail!(
            "--nats-nodes {nodes} starts a local cluster: NATS_URL must be one URL on this machine (its port is the first node's), not `{url}`"
        );
    };
    servers::cluster_url(port, nodes)
}

/// The identities of an authorized stack.
struct Auth {
    state: AuthState,
    /// Set when the ClickHouse of this stack is local (meshctl's users).
    clickhouse: Option<ClickHouseSecrets>,
}

/// Keys for the operator, the services and the agents of `entities.json`;
/// meshctl's own credentials (unless given); the ClickHouse passwords when
/// ClickHouse is local and no user was given.
fn set_up_identities(
    home: &Home,
    endpoints: &mut Endpoints,
    options: &UpOptions,
) -> anyhow::Result<Auth> {
    let state = AuthState::new(home);
    let created = state.ensure_services()?;
    if !created.is_empty() {
        line(
            "identities",
            "created",
            format_args!(
                "{} (keys in {})",
                created.join(", "),
                home.root().join("auth").display()
            ),
        );
    }
    // Registered agents are those with keys; the agents of the policy
    // directory get one, so the shipped demo agents can connect.
    if options.policies.join(SCHEMA_FILE).is_file() {
        for (id, _) in entities::entity_agents(&options.policies)? {
            if !schemas::AgentId::is_valid(&id) {
                continue;
            }
            if state.ensure_agent(&id)? {
                line(
                    "identities",
                    "created",
                    format_args!(
                        "agent `{id}` (from entities.json; seed {})",
                        state
                            .seed_file(broker_config::auth::Role::Agent, &id)
                            .display()
                    ),
                );
            }
        }
    }
    if !endpoints.nats_credentials.is_set() {
        endpoints.nats_credentials.nkey_seed_file = Some(state.admin_seed_file());
    }
    let local_clickhouse = servers::loopback_port(&endpoints.clickhouse_url, 8123).is_some();
    let clickhouse = if local_clickhouse
        && endpoints.clickhouse_user == "default"
        && endpoints.clickhouse_password.is_empty()
    {
        let secrets = state.ensure_clickhouse_secrets()?;
        endpoints.clickhouse_password = secrets.admin.clone();
        Some(secrets)
    } else {
        None
    };
    Ok(Auth { state, clickhouse })
}

async fn bring_up(
    home: &Home,
    endpoints: &Endpoints,
    options: &UpOptions,
    policies: Option<PathBuf>,
    auth: Option<&Auth>,
    started: &mut Started,
) -> anyhow::Result<()> {
    nats::ensure(
        home,
        endpoints,
        options.nats_nodes,
        options.durability,
        auth,
        started,
    )
    .await?;
    if options.clickhouse_replicas > 1 {
        replicas::ensure(home, endpoints, options.clickhouse_replicas, auth, started).await?;
    } else {
        clickhouse::ensure(home, endpoints, auth, started).await?;
    }
    clickhouse::apply_streams_and_schema(
        home,
        endpoints,
        options.stream_replicas(),
        options.stream_max_age_days,
        auth,
        options.clickhouse_replicas,
    )
    .await?;
    let waiting = services::start(home, endpoints, options, policies.as_ref(), auth, started)?;
    services::wait_ready(home, options, waiting, started).await
}

async fn wait_in_foreground(home: &Home, started: &mut Started) {
    let signal = telemetry::signal();
    tokio::pin!(signal);
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = check.tick() => {
                if output::stdout_closed() {
                    // Nobody reads this `up` any more: stop what it started.
                    break;
                }
                started.children.retain_mut(|(name, child)| match child.try_wait() {
                    Ok(Some(status)) => {
                        errln!("{name} exited ({status}); see {}", home.log_file(name).display());
                        let _ = std::fs::remove_file(home.pid_file(name));
                        false
                    }
                    _ => true,
                });
            }
        }
    }
    outln!();
}

/// `meshctl down`: stops what `up` started, as its pid files record.
pub(crate) fn down(home: &Home) -> anyhow::Result<()> {
    // Every service is stopped even when the reader has gone.
    output::finish_despite_closed_stdout();
    let mut any = false;
    for name in STOP_ORDER {
        match procs::stop(home, name, Duration::from_secs(15))? {
            None => {}
            Some(Stopped::Gracefully) => {
                any = true;
                line(name, "stopped", "");
            }
            Some(Stopped::Killed) => {
                any = true;
                line(name, "killed", "did not stop within 15s of SIGTERM");
            }
            Some(Stopped::NotRunning) => {
                any = true;
                line(name, "gone", "was not running (stale pid file removed)");
            }
        }
    }
    if !any {
        outln!(
            "Nothing to stop: `meshctl up` started nothing under {}.",
            home.root().display()
        );
    }
    Ok(())
}

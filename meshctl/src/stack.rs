//! `meshctl up`, `down` and `status`: the local stack of `docs/contract.md`.
//!
//! `up` starts what is missing — nats-server (JetStream) and
//! clickhouse-server from `PATH`, data under `.agentmesh/` — applies the
//! streams and the audit schema, then runs policy-worker, audit-sink and
//! gpu-scaler (found next to `meshctl` first, then on `PATH`). Whatever it
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
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use broker_config::auth::{AUDIT_SINK_CONSUMERS, POLICY_WORKER_CONSUMER};
use futures::StreamExt;
use policy_worker::SCHEMA_FILE;
use schemas::subjects;

use crate::agents::{self, AuthState, CLICKHOUSE_SINK_USER, ClickHouseSecrets};
use crate::procs::{self, Home, Stopped};
use crate::servers::{self, Endpoints, NatsState};

/// The services, in start order.
pub const SERVICES: [&str; 3] = ["policy-worker", "audit-sink", "gpu-scaler"];
/// Services the stack runs without when they cannot start.
const OPTIONAL: [&str; 1] = ["gpu-scaler"];
/// Everything `down` may stop, in stop order: services (the sink last, so
/// it flushes what the others produced), then the servers.
const STOP_ORDER: [&str; 5] = [
    "gpu-scaler",
    "policy-worker",
    "audit-sink",
    "clickhouse-server",
    "nats-server",
];

/// Options of `meshctl up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
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
}

/// The file that records whether the running stack has authorization.
pub fn mode_file(home: &Home) -> PathBuf {
    home.run_dir().join("stack-mode")
}

/// Whether the last `meshctl up` here turned authorization on.
pub fn auth_mode(home: &Home) -> bool {
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
                    Err(e) => eprintln!("{name:<18} {e:#}"),
                }
                let _ = child.wait();
            }
        }
    }
}

fn line(name: &str, state: &str, detail: impl std::fmt::Display) {
    println!("{name:<18} {state:<8} {detail}");
}

/// `meshctl up`.
pub async fn up(home: &Home, endpoints: &Endpoints, options: &UpOptions) -> anyhow::Result<()> {
    for name in &options.without {
        if !SERVICES.contains(&name.as_str()) {
            bail!(
                "--without `{name}`: not a service (one of {})",
                SERVICES.join(", ")
            );
        }
    }
    let policies = if options.without.iter().any(|w| w == "policy-worker") {
        None
    } else {
        let dir = &options.policies;
        if !dir.join(SCHEMA_FILE).is_file() {
            bail!(
                "policy directory `{}` has no `{SCHEMA_FILE}`: run meshctl from the repository root or pass --policies DIR",
                dir.display(),
            );
        }
        Some(std::fs::canonicalize(dir).with_context(|| format!("resolving `{}`", dir.display()))?)
    };
    home.create()?;
    let mut endpoints = endpoints.clone();
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
                eprintln!("Start failed; stopping what this command started.");
                started.stop_all(home);
            }
            return Err(e);
        }
    }
    if options.detach {
        println!("\nThe stack is up. `meshctl demo` runs the demo; `meshctl down` stops it.");
        // The children run on in their own process groups.
        return Ok(());
    }
    println!("\nThe stack is up. Ctrl-C stops what this command started.");
    wait_in_foreground(home, &mut started).await;
    started.stop_all(home);
    Ok(())
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
        for (id, _) in agents::entity_agents(&options.policies)? {
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
    // NATS.
    match servers::nats_state(endpoints).await {
        NatsState::JetStream => {
            line("nats-server", "running", &endpoints.nats_url);
            if let Some(auth) = auth {
                let client = endpoints.connect_nats().await?;
                if !client.server_info().auth_required {
                    bail!(
                        "the NATS server at {} runs without authorization (started with `--insecure`?): stop it (`meshctl down`) and run `meshctl up` again, or pass --insecure",
                        endpoints.nats_url
                    );
                }
                reload_with_every_agent(home, endpoints, &auth.state).await?;
            }
        }
        NatsState::Refused => bail!(
            "the NATS server at {} refused meshctl's credentials{}: it runs with other keys (another `.agentmesh/`?) or with authorization where --insecure was asked; stop it (`meshctl down`), or pass its operator seed with --nats-nkey-seed-file",
            endpoints.nats_url,
            endpoints
                .nats_credentials
                .nkey_seed_file
                .as_ref()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default()
        ),
        NatsState::NoJetStream => bail!(
            "the NATS server at {} has no JetStream: restart it with `-js`, or set NATS_URL to one that has",
            endpoints.nats_url
        ),
        NatsState::Unreachable => {
            let Some(port) = servers::loopback_port(&endpoints.nats_url, 4222) else {
                bail!(
                    "no NATS server answers at {} (NATS_URL), and it is not on this machine: start it, or unset NATS_URL to run one locally",
                    endpoints.nats_url
                );
            };
            let config = match auth {
                Some(auth) => Some(auth.state.write_nats_config(home, port)?),
                None => None,
            };
            let child = servers::start_nats(home, endpoints, port, config.as_deref()).await?;
            line(
                "nats-server",
                "started",
                format_args!(
                    "{} (pid {}, log {})",
                    endpoints.nats_url,
                    child.id(),
                    home.log_file("nats-server").display()
                ),
            );
            started.children.push(("nats-server", child));
        }
    }

    // ClickHouse.
    let client = endpoints.clickhouse();
    match servers::clickhouse_version(&client).await {
        Some(version) => line(
            "clickhouse-server",
            "running",
            format_args!("{}, ClickHouse {version}", endpoints.clickhouse_url),
        ),
        None => {
            let Some(port) = servers::loopback_port(&endpoints.clickhouse_url, 8123) else {
                bail!(
                    "no ClickHouse answers at {} (CLICKHOUSE_URL), and it is not on this machine: start it, or unset CLICKHOUSE_URL to run one locally",
                    endpoints.clickhouse_url
                );
            };
            let users = auth.and_then(|a| a.clickhouse.as_ref());
            if users.is_some() {
                let mut anonymous = endpoints.clone();
                anonymous.clickhouse_password.clear();
                if servers::clickhouse_version(&anonymous.clickhouse())
                    .await
                    .is_some()
                {
                    bail!(
                        "ClickHouse at {} runs without the users `meshctl up` writes (started with `--insecure`?): stop it (`meshctl down`) and run `meshctl up` again, or pass --insecure",
                        endpoints.clickhouse_url
                    );
                }
            }
            let (child, tcp_port) = servers::start_clickhouse(home, endpoints, port, users).await?;
            line(
                "clickhouse-server",
                "started",
                format_args!(
                    "{} (native port {tcp_port}, pid {}, log {})",
                    endpoints.clickhouse_url,
                    child.id(),
                    home.log_file("clickhouse-server").display()
                ),
            );
            started.children.push(("clickhouse-server", child));
        }
    }

    // Streams and schema.
    let nats = endpoints.connect_nats().await?;
    let js = async_nats::jetstream::new(nats);
    let changes = broker_config::apply(&js, &broker_config::Options::default()).await?;
    let created = changes
        .iter()
        .filter(|(_, c)| *c == broker_config::Change::Created)
        .count();
    line(
        "streams",
        "applied",
        format_args!("{} streams and buckets, {created} created", changes.len()),
    );
    let signing_keys = crate::signers::ensure_local_keys(home, &js).await?;
    line(
        "signers",
        "applied",
        format_args!(
            "{} (keys in {})",
            signing_keys
                .iter()
                .map(|(service, _, public)| format!("{service} {public}"))
                .collect::<Vec<_>>()
                .join(", "),
            crate::signers::key_file(home, "policy-worker")
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    );
    if let Some(auth) = auth {
        broker_config::provision_services(&js).await?;
        let agents = auth.state.agents()?;
        for agent in &agents {
            broker_config::provision_agent(&js, &agent.name).await?;
        }
        line(
            "identities",
            "applied",
            format_args!(
                "{} agents ({}), durable consumers in place; config {}",
                agents.len(),
                agents
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                AuthState::nats_config_path(home).display()
            ),
        );
    }
    let features = audit_sink::schema::ensure(&client, &endpoints.database, 0)
        .await
        .with_context(|| {
            format!(
                "creating the audit schema in ClickHouse at {}",
                endpoints.clickhouse_url
            )
        })?;
    line(
        "schema",
        "applied",
        format_args!(
            "database `{}`: {} (ClickHouse {})",
            endpoints.database,
            audit_sink::schema::TABLES.join(", "),
            features.version
        ),
    );

    // Services.
    let mut waiting = Vec::new();
    for name in SERVICES {
        if options.without.iter().any(|w| w == name) {
            line(name, "skipped", "--without");
            continue;
        }
        if let Some(recorded) = procs::read_pid(home, name).filter(procs::is_running) {
            line(name, "running", format_args!("pid {}", recorded.pid));
            continue;
        }
        let Some(binary) = procs::find_service(name) else {
            line(
                name,
                "skipped",
                format_args!(
                    "warning: `{name}` not found next to meshctl or on PATH (build it: `cargo build -p {name}`)"
                ),
            );
            continue;
        };
        let ready = home.ready_file(name);
        let _ = std::fs::remove_file(&ready);
        let mut args = vec!["--nats-url".to_owned(), endpoints.nats_url.clone()];
        match name {
            "policy-worker" => {
                if let Some(dir) = &policies {
                    args.extend(["--policies".to_owned(), dir.display().to_string()]);
                }
            }
            "gpu-scaler" => {
                if let Some(config) = options.gpu_config.as_ref().filter(|c| c.is_file()) {
                    let config = std::fs::canonicalize(config)
                        .with_context(|| format!("resolving `{}`", config.display()))?;
                    args.extend(["--config".to_owned(), config.display().to_string()]);
                }
            }
            "audit-sink" => args.extend([
                "--clickhouse-url".to_owned(),
                endpoints.clickhouse_url.clone(),
                "--database".to_owned(),
                endpoints.database.clone(),
            ]),
            _ => {}
        }
        args.extend(["--ready-file".to_owned(), ready.display().to_string()]);
        // Credentials go in the environment, not on the command line.
        let mut env: Vec<(&str, Option<String>)> = Vec::new();
        if let Some(auth) = auth {
            let seed = auth
                .state
                .service_seed_file(name)
                .with_context(|| format!("no identity for `{name}`"))?;
            env.push(("NATS_NKEY_SEED_FILE", Some(seed.display().to_string())));
            env.push(("NATS_CREDS", None));
        }
        if let Some((_, file, _)) = signing_keys.iter().find(|(service, _, _)| *service == name) {
            env.push((
                "AGENTMESH_SIGNING_KEY_FILE",
                Some(file.display().to_string()),
            ));
        }
        if name == "audit-sink" {
            // The sink's own insert user where meshctl wrote the users;
            // otherwise the user meshctl was given.
            let (user, password) = match auth.and_then(|a| a.clickhouse.as_ref()) {
                Some(secrets) => (CLICKHOUSE_SINK_USER.to_owned(), secrets.sink.clone()),
                None => (
                    endpoints.clickhouse_user.clone(),
                    endpoints.clickhouse_password.clone(),
                ),
            };
            env.push(("CLICKHOUSE_USER", Some(user)));
            env.push(("CLICKHOUSE_PASSWORD", Some(password)));
        }
        let child = procs::spawn_with_env(home, name, &binary, &args, &env)?;
        waiting.push(name);
        started.children.push((name, child));
    }

    // Ready files.
    let deadline = Instant::now() + options.timeout;
    for name in waiting {
        let ready = home.ready_file(name);
        let failure = loop {
            if ready.exists() {
                let pid = procs::read_pid(home, name)
                    .map(|r| r.pid)
                    .unwrap_or_default();
                line(
                    name,
                    "ready",
                    format_args!("pid {pid}, log {}", home.log_file(name).display()),
                );
                break None;
            }
            if let Some(pos) = started.children.iter().position(|(n, _)| *n == name)
                && let Ok(Some(status)) = started.children[pos].1.try_wait()
            {
                started.children.remove(pos);
                let _ = std::fs::remove_file(home.pid_file(name));
                break Some(format!(
                    "`{name}` exited ({status}) before it was ready; its log ({}) ends with:\n{}",
                    home.log_file(name).display(),
                    procs::log_tail(home, name, 2000)
                ));
            }
            if Instant::now() >= deadline {
                break Some(format!(
                    "`{name}` was not ready within {:?}; see {}",
                    options.timeout,
                    home.log_file(name).display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match failure {
            None => {}
            // The mesh runs without GPU leasing (most machines have no GPU),
            // so a scaler that cannot start is reported, not fatal.
            Some(why) if OPTIONAL.contains(&name) => {
                if let Some(pos) = started.children.iter().position(|(n, _)| *n == name) {
                    let (_, mut child) = started.children.remove(pos);
                    let _ = procs::stop(home, name, Duration::from_secs(5));
                    let _ = child.wait();
                }
                line(name, "failed", "warning: continuing without it (optional)");
                eprintln!("{why}");
            }
            Some(why) => bail!(why),
        }
    }
    Ok(())
}

/// Rewrites the config of the nats-server `up` started before and reloads
/// it until every registered agent reaches JetStream (a server not started
/// by meshctl is left alone).
async fn reload_with_every_agent(
    home: &Home,
    endpoints: &Endpoints,
    state: &AuthState,
) -> anyhow::Result<()> {
    let mut seeds = Vec::new();
    for agent in state.agents()? {
        let file = state.seed_file(broker_config::auth::Role::Agent, &agent.name);
        let (seed, _) = broker_config::credentials::read_seed_file(&file)?;
        seeds.push(seed);
    }
    let url = endpoints.nats_url.clone();
    let all_reach = || {
        let seeds = seeds.clone();
        let url = url.clone();
        async move {
            for seed in &seeds {
                if !agents::can_reach_jetstream(&url, seed).await {
                    return false;
                }
            }
            true
        }
    };
    if agents::reload_nats(home, endpoints, state, all_reach).await? == agents::Applied::Reloaded {
        line(
            "nats-server",
            "reloaded",
            format_args!("{}", AuthState::nats_config_path(home).display()),
        );
    }
    Ok(())
}

async fn wait_in_foreground(home: &Home, started: &mut Started) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("cannot listen for signals; use `meshctl down` to stop the stack");
        return;
    };
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = check.tick() => {
                started.children.retain_mut(|(name, child)| match child.try_wait() {
                    Ok(Some(status)) => {
                        eprintln!("{name} exited ({status}); see {}", home.log_file(name).display());
                        let _ = std::fs::remove_file(home.pid_file(name));
                        false
                    }
                    _ => true,
                });
            }
        }
    }
    println!();
}

/// `meshctl down`: stops what `up` started, as its pid files record.
pub fn down(home: &Home) -> anyhow::Result<()> {
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
        println!(
            "Nothing to stop: `meshctl up` started nothing under {}.",
            home.root().display()
        );
    }
    Ok(())
}

/// A durable's (pending, unacknowledged) counts.
type Queue = (u64, usize);

/// Each agent's queues, from its durables (`agent-<id>` on `MESH_DELIVER`
/// and `MESH_CALL`): (agent, deliveries, calls), by agent id.
fn agent_queues(
    consumers: &[(String, String, u64, usize, usize)],
) -> Vec<(String, Option<Queue>, Option<Queue>)> {
    type Queues = (Option<Queue>, Option<Queue>);
    let mut agents: std::collections::BTreeMap<String, Queues> = Default::default();
    for (stream, name, pending, unacked, _) in consumers {
        let Some(agent) = name.strip_prefix("agent-") else {
            continue;
        };
        let entry = agents.entry(agent.to_owned()).or_default();
        match stream.as_str() {
            subjects::STREAM_DELIVER => entry.0 = Some((*pending, *unacked)),
            subjects::STREAM_CALL => entry.1 = Some((*pending, *unacked)),
            _ => {}
        }
    }
    agents
        .into_iter()
        .filter(|(_, (deliveries, _))| deliveries.is_some())
        .map(|(agent, (deliveries, calls))| (agent, deliveries, calls))
        .collect()
}

/// `meshctl status`: each component up or down, stream depths, rows per
/// table. Returns whether NATS and ClickHouse both answer.
pub async fn status(home: &Home, endpoints: &Endpoints) -> anyhow::Result<bool> {
    let started_by = |name: &str| {
        procs::read_pid(home, name)
            .filter(procs::is_running)
            .map(|r| format!(" (pid {}, started by meshctl)", r.pid))
            .unwrap_or_default()
    };
    println!("{:<18} {:<8} detail", "component", "state");
    let nats = servers::nats_state(endpoints).await;
    match nats {
        NatsState::JetStream => line(
            "nats-server",
            "up",
            format_args!("{}{}", endpoints.nats_url, started_by("nats-server")),
        ),
        NatsState::NoJetStream => line(
            "nats-server",
            "degraded",
            format_args!("{} has no JetStream", endpoints.nats_url),
        ),
        NatsState::Refused => line(
            "nats-server",
            "refused",
            format_args!(
                "{} refuses meshctl's credentials (pass the operator seed: --nats-nkey-seed-file)",
                endpoints.nats_url
            ),
        ),
        NatsState::Unreachable => line(
            "nats-server",
            "down",
            format_args!("nothing answers at {}", endpoints.nats_url),
        ),
    }
    if auth_mode(home) {
        let state = AuthState::new(home);
        let agents = state.agents().unwrap_or_default();
        line(
            "authorization",
            "on",
            format_args!(
                "{} agents ({}); `meshctl agents list`",
                agents.len(),
                agents
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    } else if mode_file(home).is_file() {
        line(
            "authorization",
            "off",
            "started with --insecure: anyone may connect and publish anywhere",
        );
    }
    let client = endpoints.clickhouse();
    let version = servers::clickhouse_version(&client).await;
    match &version {
        Some(v) => line(
            "clickhouse-server",
            "up",
            format_args!(
                "{}, ClickHouse {v}{}",
                endpoints.clickhouse_url,
                started_by("clickhouse-server")
            ),
        ),
        None => line(
            "clickhouse-server",
            "down",
            format_args!("nothing answers at {}", endpoints.clickhouse_url),
        ),
    }

    // Consumers tell whether a service runs even when meshctl did not start it.
    let mut consumers: Vec<(String, String, u64, usize, usize)> = Vec::new();
    let mut streams: Vec<(String, u64)> = Vec::new();
    if nats == NatsState::JetStream {
        let client = endpoints.connect_nats().await?;
        let js = async_nats::jetstream::new(client);
        for config in broker_config::streams(&broker_config::Options::default()) {
            let Ok(mut stream) = js.get_stream(&config.name).await else {
                streams.push((config.name.clone(), 0));
                continue;
            };
            let messages = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
            streams.push((config.name.clone(), messages));
            let mut list = stream.consumers();
            while let Some(Ok(info)) = list.next().await {
                consumers.push((
                    config.name.clone(),
                    info.name.clone(),
                    info.num_pending,
                    info.num_ack_pending,
                    info.num_waiting,
                ));
            }
        }
    }
    for name in SERVICES {
        let consumer = match name {
            "policy-worker" => Some(POLICY_WORKER_CONSUMER),
            "audit-sink" => AUDIT_SINK_CONSUMERS
                .iter()
                .find(|(stream, _)| *stream == subjects::STREAM_INGRESS)
                .map(|(_, durable)| *durable),
            _ => None,
        };
        let pulling = consumer.is_some_and(|c| {
            consumers
                .iter()
                .any(|(_, n, _, _, waiting)| n == c && *waiting > 0)
        });
        if let Some(recorded) = procs::read_pid(home, name).filter(procs::is_running) {
            line(
                name,
                "up",
                format_args!(
                    "pid {}, log {}",
                    recorded.pid,
                    home.log_file(name).display()
                ),
            );
        } else if pulling {
            line(
                name,
                "up",
                format_args!(
                    "not started by meshctl; its consumer `{}` is pulling",
                    consumer.unwrap_or_default()
                ),
            );
        } else {
            line(name, "down", "");
        }
    }

    if nats == NatsState::JetStream {
        println!(
            "\n{:<18} {:>8}  consumers (pending / unacked)",
            "stream", "messages"
        );
        for (stream, messages) in &streams {
            let mut of_stream: Vec<String> = consumers
                .iter()
                .filter(|(s, ..)| s == stream)
                .map(|(_, name, pending, unacked, _)| format!("{name} {pending}/{unacked}"))
                .collect();
            of_stream.sort();
            println!("{stream:<18} {messages:>8}  {}", of_stream.join(", "));
        }
        let agents = agent_queues(&consumers);
        if !agents.is_empty() {
            println!(
                "\n{:<18} {:>22}  {:>18}",
                "agent", "deliveries pending/unacked", "calls pending/unacked"
            );
            for (agent, deliveries, calls) in agents {
                let pair = |q: Option<Queue>| {
                    q.map_or_else(|| "-".to_owned(), |(p, u)| format!("{p}/{u}"))
                };
                println!("{agent:<18} {:>26}  {:>21}", pair(deliveries), pair(calls));
            }
        }
    }
    if version.is_some() {
        println!(
            "\n{:<18} {:>8}",
            format!("table ({})", endpoints.database),
            "rows"
        );
        let db = endpoints.audit_db();
        for table in audit_sink::schema::TABLES {
            let rows = db
                .query(&format!("SELECT count() FROM `{table}` FINAL"))
                .fetch_one::<u64>()
                .await;
            match rows {
                Ok(n) => println!("{table:<18} {n:>8}"),
                Err(_) => println!("{table:<18} {:>8}", "missing"),
            }
        }
    }
    Ok(nats == NatsState::JetStream && version.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_queues_pair_each_agents_durables() {
        let c = |stream: &str, name: &str, pending: u64, unacked: usize| {
            (stream.to_owned(), name.to_owned(), pending, unacked, 0)
        };
        let consumers = vec![
            c("MESH_INGRESS", "policy-worker", 5, 1),
            c("MESH_DELIVER", "agent-coder", 163_000, 64),
            c("MESH_CALL", "agent-coder", 0, 2),
            c("MESH_DELIVER", "agent-planner", 0, 0),
        ];
        assert_eq!(
            agent_queues(&consumers),
            vec![
                ("coder".to_owned(), Some((163_000, 64)), Some((0, 2))),
                ("planner".to_owned(), Some((0, 0)), None),
            ]
        );
    }
}

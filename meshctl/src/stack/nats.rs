//! The NATS step of `meshctl up`: use the server that answers (reloading
//! the one `up` started before so every registered agent reaches it), or
//! start one on this machine.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Auth, Started, line};
use crate::identity::AuthState;
use crate::procs::{self, Home};
use crate::servers::{self, Endpoints, NatsState};

/// How long a reload may take to show (the server applies it asynchronously).
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// Makes sure a NATS server with JetStream (and, with `auth`, with
/// authorization) answers at `endpoints`, starting one when none does.
pub(super) async fn ensure(
    home: &Home,
    endpoints: &Endpoints,
    nodes: usize,
    durability: broker_config::server::Durability,
    auth: Option<&Auth>,
    started: &mut Started,
) -> anyhow::Result<()> {
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
            let first = endpoints.nats_url.split(',').next().unwrap_or_default();
            let Some(port) = servers::loopback_port(first, 4222) else {
                bail!(
                    "no NATS server answers at {} (NATS_URL), and it is not on this machine: start it, or unset NATS_URL to run one locally",
                    endpoints.nats_url
                );
            };
            // Recorded before the configs are written: they, and every
            // later rewrite (agents added, keys rotated), take it from there.
            servers::record_durability(home, durability)?;
            let configs = match auth {
                Some(auth) => Some(auth.state.write_nats_config(home, port, nodes)?),
                None => Some(servers::write_node_configs(home, port, nodes, None)?),
            };
            let children =
                servers::start_nats_nodes(home, endpoints, port, nodes, configs.as_deref()).await?;
            for (i, (name, child)) in children.into_iter().enumerate() {
                let (node_port, _, http) = servers::node_ports(port, i)?;
                let monitoring = if nodes > 1 {
                    format!(
                        ", {}, monitoring http://127.0.0.1:{http}",
                        servers::node_name(i)
                    )
                } else {
                    format!(", monitoring http://127.0.0.1:{http}")
                };
                let monitoring = format!("{monitoring}, durability {durability}");
                line(
                    name,
                    "started",
                    format_args!(
                        "nats://127.0.0.1:{node_port} (pid {}{monitoring}, log {})",
                        child.id(),
                        home.log_file(name).display()
                    ),
                );
                started.children.push((name, child));
            }
        }
    }

    Ok(())
}

/// Rewrites the config of the nats-server `up` started before and reloads
/// it until every registered agent reaches JetStream (a server not started
/// by meshctl is left alone).
pub(super) async fn reload_with_every_agent(
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
                if !can_reach_jetstream(&url, seed).await {
                    return false;
                }
            }
            true
        }
    };
    if reload(home, endpoints, state, all_reach).await? == Applied::Reloaded {
        line(
            "nats-server",
            "reloaded",
            format_args!("{}", AuthState::nats_config_path(home).display()),
        );
    }
    Ok(())
}

/// What happened to the running nats-server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// `meshctl up` started it: its config was rewritten and reloaded.
    Reloaded,
    /// No server of `meshctl up` runs; the next `up` uses the new config.
    NotRunning,
}

/// Rewrites the local server's config and reloads it until `ready` holds
/// (nats-server 2.9 wires the imports of an account that a reload creates
/// only on the next reload, so one SIGHUP is not always enough).
pub(crate) async fn reload<F, Fut>(
    home: &Home,
    endpoints: &Endpoints,
    state: &AuthState,
    mut ready: F,
) -> anyhow::Result<Applied>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let nodes = servers::recorded_nodes(home);
    let running: Vec<procs::Recorded> = servers::NATS_NODES[..nodes]
        .iter()
        .filter_map(|name| procs::read_pid(home, name).filter(procs::is_running))
        .collect();
    if running.is_empty() {
        return Ok(Applied::NotRunning);
    }
    let first = endpoints.nats_url.split(',').next().unwrap_or_default();
    let port = servers::loopback_port(first, 4222).with_context(|| {
        format!(
            "NATS_URL `{}` is not this machine, but `meshctl up` started a nats-server here",
            endpoints.nats_url
        )
    })?;
    state.write_nats_config(home, port, nodes)?;
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        for recorded in &running {
            let pid = rustix::process::Pid::from_raw(recorded.pid)
                .context("the recorded nats-server pid is invalid")?;
            rustix::process::kill_process(pid, rustix::process::Signal::HUP)
                .context("sending SIGHUP to nats-server")?;
        }
        let round = Instant::now() + Duration::from_secs(2);
        while Instant::now() < round {
            if ready().await {
                return Ok(Applied::Reloaded);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if Instant::now() >= deadline {
            bail!(
                "nats-server did not take the new config within {RELOAD_WAIT:?}; see {}",
                home.log_file("nats-server").display()
            );
        }
    }
}

/// Whether `seed` connects and its JetStream requests are answered.
pub(crate) async fn can_reach_jetstream(url: &str, seed: &str) -> bool {
    let options = async_nats::ConnectOptions::new()
        .nkey(seed.to_owned())
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(1);
    let connect = schemas::servers::connect(options, url);
    let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), connect).await else {
        return false;
    };
    let subject = format!(
        "$JS.API.STREAM.INFO.KV_{}",
        schemas::subjects::BUCKET_AGENTS
    );
    let request = client.request(subject, "".into());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), request).await,
        Ok(Ok(_))
    )
}

/// Whether `seed` is refused by the server at `url`.
pub(crate) async fn is_refused(url: &str, seed: &str) -> bool {
    let options = async_nats::ConnectOptions::new()
        .nkey(seed.to_owned())
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(1);
    let connect = schemas::servers::connect(options, url);
    matches!(
        tokio::time::timeout(Duration::from_secs(3), connect).await,
        Ok(Err(_))
    )
}

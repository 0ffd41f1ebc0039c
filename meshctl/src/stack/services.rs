//! The services step of `meshctl up`: start policy-worker, audit-sink,
//! gpu-scaler and mcp-gateway (each with its own credentials in the environment), then wait
//! for their ready files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Auth, OPTIONAL, SERVICES, Started, UpOptions, line};
use crate::identity::CLICKHOUSE_SINK_USER;
use crate::procs::{self, Home};
use crate::servers::Endpoints;

/// Starts the services not running yet and not left out; returns the ones
/// it started, to wait for.
pub(super) fn start(
    home: &Home,
    endpoints: &Endpoints,
    options: &UpOptions,
    policies: Option<&PathBuf>,
    auth: Option<&Auth>,
    started: &mut Started,
) -> anyhow::Result<Vec<&'static str>> {
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
        let args = service_args(home, name, endpoints, options, policies, &ready)?;
        let env = service_env(home, name, endpoints, auth)?;
        let child = procs::spawn_with_env(home, name, &binary, &args, &env)?;
        waiting.push(name);
        started.children.push((name, child));
    }

    Ok(waiting)
}

/// The command line of service `name` (credentials aside).
fn service_args(
    home: &Home,
    name: &str,
    endpoints: &Endpoints,
    options: &UpOptions,
    policies: Option<&PathBuf>,
    ready: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let mut args = vec![
        "--nats-url".to_owned(),
        endpoints.nats_url.clone(),
        // Every service applies the streams at start: at the stack's
        // replica count, or it would move them back to one.
        "--stream-replicas".to_owned(),
        options.stream_replicas().to_string(),
    ];
    if let Some(days) = options.stream_max_age_days {
        args.extend(["--stream-max-age-days".to_owned(), days.to_string()]);
    }
    match name {
        "policy-worker" => {
            if let Some(dir) = policies {
                args.extend(["--policies".to_owned(), dir.display().to_string()]);
            }
            // The worker reports each node's durability from there.
            let monitoring = super::servers::monitoring_urls(home, endpoints);
            if !monitoring.is_empty() {
                args.extend(["--nats-monitoring-url".to_owned(), monitoring.join(",")]);
            }
        }
        "gpu-scaler" => {
            if let Some(config) = options.gpu_config.as_ref().filter(|c| c.is_file()) {
                let config = std::fs::canonicalize(config)
                    .with_context(|| format!("resolving `{}`", config.display()))?;
                args.extend(["--config".to_owned(), config.display().to_string()]);
            }
        }
        "mcp-gateway" => {
            // It connects as each calling agent with the agent's own key
            // (docs/mcp.md); the tokens are `meshctl agents mcp-token`'s.
            args.truncate(2);
            let auth = home.root().join("auth");
            args.extend([
                "--tokens-file".to_owned(),
                auth.join(broker_config::mcp_tokens::TOKEN_FILE)
                    .display()
                    .to_string(),
                "--agent-keys-dir".to_owned(),
                auth.join("agents").display().to_string(),
            ]);
            if let Some(dir) = policies {
                args.extend(["--policies".to_owned(), dir.display().to_string()]);
            }
            if options.insecure {
                args.push("--insecure".to_owned());
            }
            args.extend([
                "--listen".to_owned(),
                format!("127.0.0.1:{}", mcp_port(endpoints)),
            ]);
        }
        "audit-sink" => {
            // Every replica's URL: the sink fails over between them.
            let urls = super::replicas::urls(endpoints, options.clickhouse_replicas)?;
            args.extend([
                "--clickhouse-url".to_owned(),
                urls.join(","),
                "--database".to_owned(),
                endpoints.database.clone(),
            ]);
            if options.clickhouse_replicas > 1 {
                args.push("--clickhouse-replicated".to_owned());
            }
        }
        _ => {}
    }
    args.extend(["--ready-file".to_owned(), ready.display().to_string()]);
    Ok(args)
}

/// How far above the NATS client port the MCP gateway listens (4222: 8790),
/// so that two local stacks on different ports do not collide.
const MCP_PORT_OFFSET: u16 = 4568;

/// The port of the local stack's MCP gateway: the NATS client port +
/// [`MCP_PORT_OFFSET`] (8790 for the default 4222).
pub(crate) fn mcp_port(endpoints: &Endpoints) -> u16 {
    let first = endpoints.nats_url.split(',').next().unwrap_or_default();
    super::servers::loopback_port(first, 4222)
        .and_then(|p| p.checked_add(MCP_PORT_OFFSET))
        .unwrap_or(4222 + MCP_PORT_OFFSET)
}

/// The environment of service `name`: its credentials, which go there
/// rather than on the command line.
fn service_env(
    home: &Home,
    name: &str,
    endpoints: &Endpoints,
    auth: Option<&Auth>,
) -> anyhow::Result<Vec<(&'static str, Option<String>)>> {
    let mut env: Vec<(&'static str, Option<String>)> = Vec::new();
    // The MCP gateway has no identity of its own: it acts as the agents.
    if let Some(auth) = auth.filter(|_| name != "mcp-gateway") {
        let seed = auth
            .state
            .service_seed_file(name)
            .with_context(|| format!("no identity for `{name}`"))?;
        env.push(("NATS_NKEY_SEED_FILE", Some(seed.display().to_string())));
        env.push(("NATS_CREDS", None));
    }
    // The signing key `meshctl up` made and registered (`meshctl signers`).
    if crate::signers::SIGNING_SERVICES.contains(&name) {
        let key = crate::signers::key_file(home, name);
        env.push((
            "AGENTMESH_SIGNING_KEY_FILE",
            Some(key.display().to_string()),
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
    Ok(env)
}

/// Waits for each service's ready file; an optional service that fails is
/// reported and stopped, any other failure stops `up`.
pub(super) async fn wait_ready(
    home: &Home,
    options: &UpOptions,
    waiting: Vec<&'static str>,
    started: &mut Started,
) -> anyhow::Result<()> {
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
                errln!("{why}");
            }
            Some(why) => bail!(why),
        }
    }
    Ok(())
}

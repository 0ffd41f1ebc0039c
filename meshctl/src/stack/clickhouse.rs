//! The ClickHouse step of `meshctl up`: use the server that answers, or
//! start one on this machine with the users `up` writes; then the streams,
//! the services' and agents' durables, and the audit schema.

use anyhow::{Context, bail};

use super::{Auth, Started, line};
use crate::identity::AuthState;
use crate::procs::Home;
use crate::servers::{self, Endpoints};

/// Makes sure ClickHouse answers at `endpoints`, starting one when none does.
pub(super) async fn ensure(
    home: &Home,
    endpoints: &Endpoints,
    auth: Option<&Auth>,
    started: &mut Started,
) -> anyhow::Result<()> {
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

    Ok(())
}

/// Applies the streams and buckets, the durables of the services and of
/// every registered agent (with `auth`), and the audit schema.
pub(super) async fn apply_streams_and_schema(
    home: &Home,
    endpoints: &Endpoints,
    replicas: usize,
    max_age_days: Option<u64>,
    auth: Option<&Auth>,
    clickhouse_replicas: usize,
) -> anyhow::Result<()> {
    let nats = endpoints.connect_nats().await?;
    let js = async_nats::jetstream::new(nats);
    let broker = broker_config::Options {
        replicas,
        ..broker_config::Options::default()
    }
    .with_max_age_days(max_age_days);
    let changes = broker_config::apply(&js, &broker).await?;
    let created = changes
        .iter()
        .filter(|(_, c)| *c == broker_config::Change::Created)
        .count();
    line(
        "streams",
        "applied",
        format_args!(
            "{} streams and buckets at {replicas} replica(s), {created} created",
            changes.len()
        ),
    );
    let signing_keys = crate::signers::ensure_local_keys(home, &js).await?;
    line(
        "signers",
        "applied",
        format_args!(
            "{} (seeds in {})",
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
    apply_schema(endpoints, clickhouse_replicas).await
}

/// Creates the audit schema (on every replica when there are several).
async fn apply_schema(endpoints: &Endpoints, clickhouse_replicas: usize) -> anyhow::Result<()> {
    let (version, kind) = if clickhouse_replicas > 1 {
        let version = super::replicas::apply_schema(endpoints, clickhouse_replicas).await?;
        (
            version,
            format!(", replicated on {clickhouse_replicas} replicas"),
        )
    } else {
        let features =
            audit_tables::schema::ensure(&endpoints.clickhouse(), &endpoints.database, 0)
                .await
                .with_context(|| {
                    format!(
                        "creating the audit schema in ClickHouse at {}",
                        endpoints.clickhouse_url
                    )
                })?;
        (features.version, String::new())
    };
    line(
        "schema",
        "applied",
        format_args!(
            "database `{}`: {}{kind} (ClickHouse {version})",
            endpoints.database,
            audit_tables::schema::TABLES.join(", "),
        ),
    );

    Ok(())
}

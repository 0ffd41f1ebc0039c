//! `meshctl status`: each component up or down, stream depths and
//! consumers, each agent's queues, rows per table.

use broker_config::auth::{AUDIT_SINK_CONSUMERS, POLICY_WORKER_CONSUMER};
use futures::StreamExt;
use schemas::subjects;

use super::{SERVICES, auth_mode, mode_file};
use crate::identity::AuthState;
use crate::procs::{self, Home};
use crate::servers::{self, Endpoints, NatsState};

/// A durable's (pending, unacknowledged) counts.
type Queue = (u64, usize);

/// Each agent's queues, from its durables (`agent-<id>` on `MESH_DELIVER`
/// and `MESH_CALL`): (agent, deliveries, calls), by agent id.
fn agent_queues(consumers: &[ConsumerRow]) -> Vec<(String, Option<Queue>, Option<Queue>)> {
    type Queues = (Option<Queue>, Option<Queue>);
    let mut agents: std::collections::BTreeMap<String, Queues> = Default::default();
    for (stream, name, pending, unacked, _) in consumers {
        let Some(agent) = subjects::agent_of_consumer(name) else {
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

/// One durable: (stream, name, pending, unacknowledged, waiting pulls).
type ConsumerRow = (String, String, u64, usize, usize);

/// What `status` found: printed as it goes, or collected for `-o json`.
#[derive(Default, serde::Serialize)]
struct Report {
    #[serde(skip)]
    json: bool,
    /// Whether NATS (with JetStream) and ClickHouse both answer.
    ok: bool,
    /// `{name, state, detail}` per component, in the text's order.
    components: Vec<serde_json::Value>,
    /// `{name, messages, consumers: [{name, pending, unacked}]}`.
    streams: Vec<serde_json::Value>,
    /// `{agent, deliveries: {pending, unacked}, calls}` per agent durable.
    agents: Vec<serde_json::Value>,
    /// The audit database.
    database: String,
    /// `{table, rows}` (`rows` null when the table is missing).
    tables: Vec<serde_json::Value>,
    /// `{monitoring_url, server, version, sync, sync_interval_secs}` per
    /// NATS node, from its `/varz`: `sync` is `always` (every write fsynced
    /// before it is acknowledged), `interval` or `unknown` (with `error`).
    durability: Vec<serde_json::Value>,
}

impl Report {
    fn line(&mut self, name: &str, state: &str, detail: impl std::fmt::Display) {
        if self.json {
            self.components.push(serde_json::json!({
                "name": name,
                "state": state,
                "detail": detail.to_string(),
            }));
        } else {
            super::line(name, state, detail);
        }
    }
}

/// `meshctl status`: each component up or down, stream depths, rows per
/// table (or all of it as one JSON document). Returns whether NATS and
/// ClickHouse both answer.
pub(crate) async fn status(home: &Home, endpoints: &Endpoints, json: bool) -> anyhow::Result<bool> {
    let mut report = Report {
        json,
        database: endpoints.database.clone(),
        ..Report::default()
    };
    let report = &mut report;
    if !json {
        outln!("{:<18} {:<8} detail", "component", "state");
    }
    let nats = servers::nats_state(endpoints).await;
    let nodes = servers::recorded_nodes(home);
    let (streams, consumers, leaders) = if nats == NatsState::JetStream {
        read_streams(endpoints).await?
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    if nodes > 1 && endpoints.nats_url.contains(',') {
        print_nodes(report, home, endpoints, &leaders).await;
    } else {
        print_nats(report, home, endpoints, nats);
    }
    if nats == NatsState::JetStream {
        print_durability(report, home, endpoints).await;
    }
    print_authorization(report, home);
    let version = clickhouse_line(report, home, endpoints).await;
    print_services(report, home, &consumers);
    if nats == NatsState::JetStream {
        print_streams(report, &streams, &consumers);
    }
    if version.is_some() {
        print_tables(report, endpoints).await;
    }
    report.ok = nats == NatsState::JetStream && version.is_some();
    if json {
        crate::output::print_json(report)?;
    }
    Ok(report.ok)
}

/// ` (pid …, started by meshctl)` when `up` started `name` and it runs.
fn started_by(home: &Home, name: &str) -> String {
    procs::read_pid(home, name)
        .filter(procs::is_running)
        .map(|r| format!(" (pid {}, started by meshctl)", r.pid))
        .unwrap_or_default()
}

fn print_nats(report: &mut Report, home: &Home, endpoints: &Endpoints, nats: NatsState) {
    let started_by = |name: &str| started_by(home, name);
    match nats {
        NatsState::JetStream => report.line(
            "nats-server",
            "up",
            format_args!("{}{}", endpoints.nats_url, started_by("nats-server")),
        ),
        NatsState::NoJetStream => report.line(
            "nats-server",
            "degraded",
            format_args!("{} has no JetStream", endpoints.nats_url),
        ),
        NatsState::Refused => report.line(
            "nats-server",
            "refused",
            format_args!(
                "{} refuses meshctl's credentials (pass the operator seed: --nats-nkey-seed-file)",
                endpoints.nats_url
            ),
        ),
        NatsState::Unreachable => report.line(
            "nats-server",
            "down",
            format_args!("nothing answers at {}", endpoints.nats_url),
        ),
    }
}

fn print_authorization(report: &mut Report, home: &Home) {
    if auth_mode(home) {
        let state = AuthState::new(home);
        let agents = state.agents().unwrap_or_default();
        report.line(
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
        report.line(
            "authorization",
            "off",
            "started with --insecure: anyone may connect and publish anywhere",
        );
    }
}

/// The ClickHouse line; the server's version when it answers.
async fn clickhouse_line(
    report: &mut Report,
    home: &Home,
    endpoints: &Endpoints,
) -> Option<String> {
    let started_by = |name: &str| started_by(home, name);
    let client = endpoints.clickhouse();
    let version = servers::clickhouse_version(&client).await;
    match &version {
        Some(v) => report.line(
            "clickhouse-server",
            "up",
            format_args!(
                "{}, ClickHouse {v}{}",
                endpoints.clickhouse_url,
                started_by("clickhouse-server")
            ),
        ),
        None => report.line(
            "clickhouse-server",
            "down",
            format_args!("nothing answers at {}", endpoints.clickhouse_url),
        ),
    }
    print_replicas(report, home, endpoints).await;
    version
}

/// One line per node of the local cluster: up or down, and the streams
/// (and buckets) whose JetStream leader it is.
async fn print_nodes(
    report: &mut Report,
    home: &Home,
    endpoints: &Endpoints,
    leaders: &[(String, String)],
) {
    for (i, url) in endpoints.nats_url.split(',').enumerate() {
        let name = servers::node_name(i);
        let node = Endpoints {
            nats_url: url.to_owned(),
            ..endpoints.clone()
        };
        let pid = servers::NATS_NODES
            .get(i)
            .map(|n| started_by(home, n))
            .unwrap_or_default();
        let led: Vec<&str> = leaders
            .iter()
            .filter(|(_, leader)| *leader == name)
            .map(|(stream, _)| stream.as_str())
            .collect();
        let leads = if led.is_empty() {
            "leads no stream".to_owned()
        } else {
            format!("leads {}", led.join(", "))
        };
        match servers::nats_state(&node).await {
            NatsState::JetStream => report.line(
                &format!("nats {name}"),
                "up",
                format_args!("{url}{pid}; {leads}"),
            ),
            NatsState::Unreachable => report.line(
                &format!("nats {name}"),
                "down",
                format_args!("nothing answers at {url}"),
            ),
            NatsState::NoJetStream => report.line(
                &format!("nats {name}"),
                "degraded",
                format_args!(
                    "{url}{pid}: JetStream does not answer (electing a leader after a node loss, or fewer than 2 of 3 nodes up)"
                ),
            ),
            NatsState::Refused => report.line(
                &format!("nats {name}"),
                "refused",
                format_args!("{url} refuses meshctl's credentials"),
            ),
        }
    }
}

/// One line per NATS node: whether it fsyncs every write before it
/// acknowledges it (its `/varz`), or why that is not known.
async fn print_durability(report: &mut Report, home: &Home, endpoints: &Endpoints) {
    let urls = servers::monitoring_urls(home, endpoints);
    if urls.is_empty() {
        report.line(
            "durability",
            "unknown",
            "no monitoring endpoint: set NATS_MONITORING_URL to the nodes' http://host:port (nats-server -m)",
        );
        return;
    }
    for url in urls {
        let read = broker_config::server::read_node_sync(&url, std::time::Duration::from_secs(3));
        match read.await {
            Ok(node) => {
                if node.sync_always {
                    report.line(
                        "durability",
                        "always",
                        format_args!(
                            "{} (nats-server {}): every write fsynced before it is acknowledged",
                            node.server_name, node.version
                        ),
                    );
                } else {
                    report.line(
                        "durability",
                        "interval",
                        format_args!(
                            "{} (nats-server {}): {}; an OS crash or power cut of this node loses what it acknowledged since its last flush",
                            node.server_name,
                            node.version,
                            node.describe()
                        ),
                    );
                }
                report.durability.push(serde_json::json!({
                    "monitoring_url": url,
                    "server": node.server_name,
                    "version": node.version,
                    "sync": node.durability().as_str(),
                    "sync_interval_secs": node.sync_interval_secs,
                }));
            }
            Err(e) => {
                report.line("durability", "unknown", &e);
                report.durability.push(serde_json::json!({
                    "monitoring_url": url,
                    "sync": "unknown",
                    "error": e.to_string(),
                }));
            }
        }
    }
}

/// ZooKeeper and the other ClickHouse replicas, when `up
/// --clickhouse-replicas` started them (their pid files say so).
async fn print_replicas(report: &mut Report, home: &Home, endpoints: &Endpoints) {
    let recorded = |name: &str| procs::read_pid(home, name).is_some();
    if !recorded("zookeeper") {
        return;
    }
    let zookeeper = std::fs::read_to_string(home.root().join("zookeeper/zoo.cfg"))
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("clientPort=")?.trim().parse::<u16>().ok())
        });
    match zookeeper {
        Some(port) if super::replicas::serving(port).await => report.line(
            "zookeeper",
            "up",
            format_args!("127.0.0.1:{port}{}", started_by(home, "zookeeper")),
        ),
        _ => report.line("zookeeper", "down", "does not serve"),
    }
    let replicas = (2..=super::replicas::MAX_REPLICAS)
        .take_while(|i| recorded(super::replicas::process_name(*i)))
        .count()
        + 1;
    let Ok(urls) = super::replicas::urls(endpoints, replicas) else {
        return;
    };
    for (i, url) in urls.iter().enumerate().skip(1) {
        let name = super::replicas::process_name(i + 1);
        let mut at = endpoints.clone();
        at.clickhouse_url = url.clone();
        match servers::clickhouse_version(&at.clickhouse()).await {
            Some(v) => report.line(
                name,
                "up",
                format_args!("{url}, ClickHouse {v}{}", started_by(home, name)),
            ),
            None => report.line(name, "down", format_args!("nothing answers at {url}")),
        }
    }
}

/// (stream, name of the node leading it) for every stream and bucket in a
/// cluster (none on a single server).
type Leaders = Vec<(String, String)>;

/// Each stream's message count, its consumers, and on a cluster the node
/// leading each stream and bucket.
async fn read_streams(
    endpoints: &Endpoints,
) -> anyhow::Result<(Vec<(String, u64)>, Vec<ConsumerRow>, Leaders)> {
    // Consumers tell whether a service runs even when meshctl did not start it.
    let mut consumers: Vec<ConsumerRow> = Vec::new();
    let mut streams: Vec<(String, u64)> = Vec::new();
    let mut leaders: Leaders = Vec::new();
    let client = endpoints.connect_nats().await?;
    let js = async_nats::jetstream::new(client);
    let options = broker_config::Options::default();
    for config in broker_config::buckets(&options) {
        if let Ok(mut stream) = js.get_stream(&config.name).await
            && let Ok(info) = stream.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
        {
            leaders.push((config.name.clone(), leader));
        }
    }
    for config in broker_config::streams(&options) {
        let Ok(mut stream) = js.get_stream(&config.name).await else {
            streams.push((config.name.clone(), 0));
            continue;
        };
        let (messages, leader) = stream
            .info()
            .await
            .map(|i| {
                (
                    i.state.messages,
                    i.cluster.as_ref().and_then(|c| c.leader.clone()),
                )
            })
            .unwrap_or_default();
        if let Some(leader) = leader {
            leaders.push((config.name.clone(), leader));
        }
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
    // Streams first, then buckets, as `meshctl status` lists them.
    leaders.sort_by_key(|(name, _)| name.starts_with("KV_"));
    Ok((streams, consumers, leaders))
}

/// Each service up or down: started by meshctl, or its consumer pulling.
fn print_services(report: &mut Report, home: &Home, consumers: &[ConsumerRow]) {
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
            report.line(
                name,
                "up",
                format_args!(
                    "pid {}, log {}",
                    recorded.pid,
                    home.log_file(name).display()
                ),
            );
        } else if pulling {
            report.line(
                name,
                "up",
                format_args!(
                    "not started by meshctl; its consumer `{}` is pulling",
                    consumer.unwrap_or_default()
                ),
            );
        } else {
            report.line(name, "down", "");
        }
    }
}

/// Stream depths with their consumers, then each agent's queues.
fn print_streams(report: &mut Report, streams: &[(String, u64)], consumers: &[ConsumerRow]) {
    if report.json {
        report.streams = streams
            .iter()
            .map(|(stream, messages)| {
                let consumers: Vec<serde_json::Value> = consumers
                    .iter()
                    .filter(|(s, ..)| s == stream)
                    .map(|(_, name, pending, unacked, _)| {
                        serde_json::json!({"name": name, "pending": pending, "unacked": unacked})
                    })
                    .collect();
                serde_json::json!({"name": stream, "messages": messages, "consumers": consumers})
            })
            .collect();
        let queue =
            |q: Option<Queue>| q.map(|(p, u)| serde_json::json!({"pending": p, "unacked": u}));
        report.agents = agent_queues(consumers)
            .into_iter()
            .map(|(agent, deliveries, calls)| {
                serde_json::json!({"agent": agent, "deliveries": queue(deliveries), "calls": queue(calls)})
            })
            .collect();
        return;
    }
    outln!(
        "\n{:<18} {:>8}  consumers (pending / unacked)",
        "stream",
        "messages"
    );
    for (stream, messages) in streams {
        let mut of_stream: Vec<String> = consumers
            .iter()
            .filter(|(s, ..)| s == stream)
            .map(|(_, name, pending, unacked, _)| format!("{name} {pending}/{unacked}"))
            .collect();
        of_stream.sort();
        outln!("{stream:<18} {messages:>8}  {}", of_stream.join(", "));
    }
    let agents = agent_queues(consumers);
    if !agents.is_empty() {
        outln!(
            "\n{:<18} {:>22}  {:>18}",
            "agent",
            "deliveries pending/unacked",
            "calls pending/unacked"
        );
        for (agent, deliveries, calls) in agents {
            let pair =
                |q: Option<Queue>| q.map_or_else(|| "-".to_owned(), |(p, u)| format!("{p}/{u}"));
            outln!("{agent:<18} {:>26}  {:>21}", pair(deliveries), pair(calls));
        }
    }
}

/// Rows per audit table.
async fn print_tables(report: &mut Report, endpoints: &Endpoints) {
    if report.json {
        let db = endpoints.audit_db();
        for table in audit_tables::schema::TABLES {
            let rows = db
                .query(&format!("SELECT count() FROM `{table}` FINAL"))
                .fetch_one::<u64>()
                .await
                .ok();
            report
                .tables
                .push(serde_json::json!({"table": table, "rows": rows}));
        }
        return;
    }
    outln!(
        "\n{:<18} {:>8}",
        format!("table ({})", endpoints.database),
        "rows"
    );
    let db = endpoints.audit_db();
    for table in audit_tables::schema::TABLES {
        let rows = db
            .query(&format!("SELECT count() FROM `{table}` FINAL"))
            .fetch_one::<u64>()
            .await;
        match rows {
            Ok(n) => outln!("{table:<18} {n:>8}"),
            Err(_) => outln!("{table:<18} {:>8}", "missing"),
        }
    }
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

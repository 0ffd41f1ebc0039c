//! What the fault tests under load share (`cluster_faults`,
//! `replicated_clickhouse`): the events they publish, a publisher at a
//! steady rate that retries as the contract asks of clients, and the
//! checks of one ClickHouse replica after recovery through `FINAL` and the
//! shipped queries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use audit_sink::queries;
use schemas::subjects;
use testkit::ClickHouseServer;
pub use testkit::load::{allowed, event, index_of};
use tokio_util::sync::CancellationToken;

/// How far a [`publish_steadily`] run has come.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events whose publish has started.
    pub attempted: AtomicU64,
    /// Events JetStream acknowledged.
    pub published: AtomicU64,
    /// Publishes tried again (no ack, an error, a timeout).
    pub retries: AtomicU64,
}

/// Publishes up to `total` [`event`]s at `rate` per second, or fewer when
/// `stop` is cancelled first (checked between events, so every event
/// started is published). Each publish is retried until JetStream
/// acknowledges it — the client's side of the contract; the same
/// `Nats-Msg-Id` makes a retry of a publish that did land a no-op.
pub async fn publish_steadily(
    js: jetstream::Context,
    run: String,
    rate: u64,
    total: u64,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let start = Instant::now();
    for i in 0..total {
        if stop.is_cancelled() {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        progress.attempted.store(i + 1, Ordering::SeqCst);
        let (subject, headers, body) = event(&run, i);
        loop {
            let message = PublishMessage::build()
                .headers(headers.clone())
                .payload(body.clone().into());
            let stored = match js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if stored {
                break;
            }
            progress.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        progress.published.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// One number a query returns (`None` while the server does not answer).
pub async fn number(ch: &ClickHouseServer, sql: &str) -> Option<u64> {
    ch.query_text(sql).await.ok()?.trim().parse().ok()
}

/// A shipped query, rendered with `params`, run on `ch` in `database`.
async fn shipped(
    ch: &ClickHouseServer,
    database: &str,
    query: queries::Query,
    params: &[(&str, &str)],
) -> anyhow::Result<Vec<String>> {
    let params: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let sql = queries::render(query.sql, &params)?;
    let client = ch.client().with_database(database);
    let text = testkit::clickhouse::query_text(&client, &sql).await?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// Checks one replica after recovery, for `n` [`event`]s: `n` events and
/// `n` decisions in `database` through `FINAL`, each `(agent, event_id)`
/// once, the decisions split as published, and the shipped queries
/// (`tools_by_agent`, `denials`) counting each call and denial once.
pub async fn assert_replica(
    name: &str,
    ch: &ClickHouseServer,
    database: &str,
    n: u64,
) -> anyhow::Result<()> {
    // Events 0, 10, 20, … are denied calls; 1, 11, 21, … invalid.
    let denied = n.div_ceil(10);
    let invalid = (n + 8) / 10;
    for table in ["events", "decisions"] {
        let sql = format!(
            "SELECT count(), uniqExact(agent, event_id) FROM {database}.{table} FINAL FORMAT TSV"
        );
        let counts = ch.query_text(&sql).await?;
        anyhow::ensure!(
            counts.trim() == format!("{n}\t{n}"),
            "{name}: {table} FINAL (rows, distinct events) is {counts:?}, want {n} and {n}"
        );
    }
    let decisions = ch
        .query_text(&format!(
            "SELECT decision, count() FROM {database}.decisions FINAL GROUP BY decision ORDER BY decision FORMAT TSV"
        ))
        .await?;
    anyhow::ensure!(
        decisions
            == format!(
                "allow\t{}\ndeny\t{denied}\ninvalid\t{invalid}\n",
                n - denied - invalid
            ),
        "{name}: decisions by verdict: {decisions:?}"
    );
    let range = [
        ("from", "2000-01-01 00:00:00"),
        ("to", "2100-01-01 00:00:00"),
    ];
    let tools = shipped(ch, database, queries::TOOLS_BY_AGENT, &range).await?;
    let tools: Vec<String> = tools
        .iter()
        .map(|l| l.split('\t').take(7).collect::<Vec<_>>().join(" "))
        .collect();
    anyhow::ensure!(
        tools == vec![format!("coder shell.exec {denied} 0 {denied} 0 0")],
        "{name}: tools_by_agent: {tools:?}"
    );
    // One line per denial and determining policy: each pair once, and
    // every denied event there.
    let denials = shipped(ch, database, queries::DENIALS, &range).await?;
    let pairs: HashSet<(&str, &str)> = denials
        .iter()
        .filter_map(|l| {
            let mut columns = l.split('\t');
            let policy = columns.nth(1)?;
            Some((columns.nth(1)?, policy))
        })
        .collect();
    anyhow::ensure!(
        pairs.len() == denials.len(),
        "{name}: a denial shown twice: {denials:?}"
    );
    let events: HashSet<&str> = pairs.iter().map(|(event, _)| *event).collect();
    anyhow::ensure!(
        events.len() as u64 == denied,
        "{name}: {} denied events in `denials`, want {denied}",
        events.len()
    );
    let raw = ch
        .query_text(&format!("SELECT count() FROM {database}.events"))
        .await?;
    eprintln!(
        "{name}: {n} events and {n} decisions through FINAL, {} event rows before merging",
        raw.trim()
    );
    Ok(())
}

/// How many times each event id (`ce-id`) was delivered: every message of
/// `MESH_DELIVER`.
pub async fn deliveries(js: &jetstream::Context) -> anyhow::Result<HashMap<String, u32>> {
    let mut per_event: HashMap<String, u32> = HashMap::new();
    for m in testkit::stream_messages(js, subjects::STREAM_DELIVER).await? {
        if let Some(id) = m.headers.get("ce-id") {
            *per_event.entry(id.as_str().to_owned()).or_default() += 1;
        }
    }
    Ok(per_event)
}

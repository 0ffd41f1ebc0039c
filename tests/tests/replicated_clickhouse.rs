//! The audit sink on replicated ClickHouse, with the replica it writes to
//! killed under load: ZooKeeper and two ClickHouse replicas of one shard,
//! the audit tables `ReplicatedReplacingMergeTree` (`--clickhouse-replicated`),
//! the sink given both URLs. Events go through the policy worker at a steady
//! rate; the replica the sink writes to is SIGKILLed and started again. Then,
//! on BOTH replicas, through `FINAL` and the shipped queries: every
//! published event is stored once with its one decision, and every allowed
//! event was delivered once (`MESH_DELIVER`). Prints the time until rows
//! flowed again after the kill and the rows per second through the run.
//!
//! Needs ZooKeeper (`AGENTMESH_REPLICATED=1 scripts/install-deps.sh`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use audit_sink::queries;
use e2e::WAIT;
use futures::StreamExt;
use schemas::subjects;
use testkit::{ClickHouseServer, NatsServer, ZooKeeperServer, eventually};
use tokio_util::sync::CancellationToken;

/// Events per second the publisher keeps up.
const RATE: u64 = 150;
/// Seconds of load.
const SECS: u64 = 16;
/// When the replica the sink writes to is killed, and for how long.
const KILL_AT: Duration = Duration::from_secs(5);
const DOWN_FOR: Duration = Duration::from_secs(3);

/// Event `i`: of every 10, 8 allowed handoffs, 1 denied `shell.exec` call,
/// 1 invalid (the source does not match the subject).
fn event(run: &str, i: u64) -> (String, HeaderMap, String) {
    let id = format!("{run}-{i}");
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id.as_str());
    h.insert("Nats-Msg-Id", id.as_str());
    h.insert("ce-datacontenttype", "application/json");
    let subject = match i % 10 {
        0 => {
            h.insert("ce-source", "/agents/coder");
            h.insert("ce-type", "io.agentmesh.tool.call");
            h.insert("ce-subject", "shell.exec");
            subjects::ingress("coder", "tool_call")
        }
        1 => {
            h.insert("ce-source", "/agents/coder");
            h.insert("ce-type", "io.agentmesh.task.handoff");
            subjects::ingress("planner", "handoff")
        }
        _ => {
            h.insert("ce-source", "/agents/planner");
            h.insert("ce-type", "io.agentmesh.task.handoff");
            h.insert("ce-target", "coder");
            subjects::ingress("planner", "handoff")
        }
    };
    (subject, h, format!("{{\"i\":{i}}}"))
}

/// One number a query returns (`None` while the server does not answer).
async fn number(ch: &ClickHouseServer, sql: &str) -> Option<u64> {
    ch.query_text(sql).await.ok()?.trim().parse().ok()
}

/// A shipped query, rendered with `params`, run on `ch` in `agentmesh`.
async fn shipped(
    ch: &ClickHouseServer,
    query: queries::Query,
    params: &[(&str, &str)],
) -> anyhow::Result<Vec<String>> {
    let params: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let sql = queries::render(query.sql, &params)?;
    let client = ch.client().with_database("agentmesh");
    let text = testkit::clickhouse::query_text(&client, &sql).await?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// Every message of `stream` (an ordered consumer reads them all).
async fn read_all(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let mut s = js.get_stream(stream).await?;
    let total = s.info().await?.state.messages as usize;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        match tokio::time::timeout(WAIT, messages.next()).await {
            Ok(Some(Ok(m))) => out.push(m),
            _ => anyhow::bail!("read {} of {total} messages of {stream}", out.len()),
        }
    }
    Ok(out)
}

/// Checks one replica after recovery: `n` events and `n` decisions through
/// `FINAL`, each `(agent, event_id)` once, the decisions split as published,
/// and the shipped queries counting each call and denial once.
async fn assert_replica(
    name: &str,
    ch: &ClickHouseServer,
    n: u64,
    denied: u64,
) -> anyhow::Result<()> {
    for table in ["events", "decisions"] {
        let sql = format!(
            "SELECT count(), uniqExact(agent, event_id) FROM agentmesh.{table} FINAL FORMAT TSV"
        );
        let counts = ch.query_text(&sql).await?;
        assert_eq!(
            counts.trim(),
            format!("{n}\t{n}"),
            "{name}: {table} FINAL (rows, distinct events)"
        );
    }
    let decisions = ch
        .query_text(
            "SELECT decision, count() FROM agentmesh.decisions FINAL GROUP BY decision ORDER BY decision FORMAT TSV",
        )
        .await?;
    assert_eq!(
        decisions,
        format!(
            "allow\t{}\ndeny\t{denied}\ninvalid\t{denied}\n",
            n - 2 * denied
        ),
        "{name}: decisions by verdict"
    );
    let range = [
        ("from", "2000-01-01 00:00:00"),
        ("to", "2100-01-01 00:00:00"),
    ];
    let tools = shipped(ch, queries::TOOLS_BY_AGENT, &range).await?;
    let tools: Vec<String> = tools
        .iter()
        .map(|l| l.split('\t').take(7).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        tools,
        vec![format!("coder shell.exec {denied} 0 {denied} 0 0")],
        "{name}: tools_by_agent"
    );
    // One line per denial and determining policy: each pair once, and
    // every denied event there.
    let denials = shipped(ch, queries::DENIALS, &range).await?;
    let pairs: HashSet<(&str, &str)> = denials
        .iter()
        .filter_map(|l| {
            let mut columns = l.split('\t');
            let policy = columns.nth(1)?;
            Some((columns.nth(1)?, policy))
        })
        .collect();
    assert_eq!(pairs.len(), denials.len(), "{name}: a denial shown twice");
    let events: HashSet<&str> = pairs.iter().map(|(event, _)| *event).collect();
    assert_eq!(events.len() as u64, denied, "{name}: denied events");
    let raw = ch
        .query_text("SELECT count() FROM agentmesh.events")
        .await?;
    eprintln!(
        "{name}: {n} events and {n} decisions through FINAL, {} event rows before merging",
        raw.trim()
    );
    Ok(())
}

#[tokio::test]
async fn the_replica_the_sink_writes_to_killed_under_load_loses_nothing_and_shows_no_duplicate()
-> anyhow::Result<()> {
    let zookeeper = ZooKeeperServer::start().await?;
    let mut first = ClickHouseServer::start_replica(&zookeeper, "ch-1").await?;
    let second = ClickHouseServer::start_replica(&zookeeper, "ch-2").await?;
    let nats = NatsServer::start().await?;
    let js = jetstream::new(nats.connect().await?);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let dir = tempfile::tempdir()?;

    let stop = CancellationToken::new();
    let worker_ready = dir.path().join("worker.ready");
    let worker = tokio::spawn(policy_worker::run(
        policy_worker::Config {
            nats: broker_config::NatsArgs::url(nats.url()),
            policies: testkit::shipped_policies(),
            watch_policies: false,
            ack_wait_secs: 5,
            ready_file: Some(worker_ready.clone()),
            ..Default::default()
        },
        stop.clone(),
    ));
    let sink_ready = dir.path().join("sink.ready");
    let mut config =
        audit_sink::Config::new(nats.url(), format!("{},{}", first.url(), second.url()));
    config.clickhouse_replicated = true;
    config.batch_period_ms = 200;
    config.insert_timeout_ms = 5_000;
    config.retry_max_ms = 1_000;
    config.ack_wait_ms = 10_000;
    config.ready_file = Some(sink_ready.clone());
    let sink = tokio::spawn(audit_sink::run(config, stop.clone()));
    eventually(WAIT, "the worker and the sink ready", || async {
        (worker_ready.exists() && sink_ready.exists()).then_some(())
    })
    .await?;
    for ch in [&first, &second] {
        let engine = ch
            .query_text(
                "SELECT engine FROM system.tables WHERE database = 'agentmesh' AND name = 'events'",
            )
            .await?;
        assert_eq!(engine.trim(), "ReplicatedReplacingMergeTree");
    }

    // Steady load, every publish retried until JetStream stored it.
    let run = uuid::Uuid::now_v7().simple().to_string();
    let total = RATE * SECS;
    let published = Arc::new(AtomicU64::new(0));
    let load = {
        let (js, run, published) = (js.clone(), run.clone(), published.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / RATE as f64);
                tokio::time::sleep_until(due.into()).await;
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let started = Instant::now();

    // The sink writes to the first URL: rows reach ch-1, then it dies.
    tokio::time::sleep_until((started + KILL_AT).into()).await;
    eventually(WAIT, "rows on ch-1 before the kill", || async {
        number(&first, "SELECT count() FROM agentmesh.decisions")
            .await
            .filter(|n| *n > 0)
    })
    .await?;
    let kill_us = chrono::Utc::now().timestamp_micros();
    first.stop()?;
    let killed = Instant::now();
    eprintln!(
        "ch-1 killed (SIGKILL) after {:.1} s, {} events published",
        started.elapsed().as_secs_f64(),
        published.load(Ordering::Relaxed)
    );
    // Rows flow again once an event published after the kill is in ch-2.
    let fresh = format!("SELECT count() FROM agentmesh.events WHERE received_us > {kill_us}");
    eventually(WAIT, "rows on ch-2 after the kill", || async {
        number(&second, &fresh).await.filter(|n| *n > 0)
    })
    .await?;
    let resumed = killed.elapsed();
    eprintln!(
        "rows flowing again into ch-2 {:.0} ms after the kill",
        resumed.as_secs_f64() * 1000.0
    );
    tokio::time::sleep_until((killed + DOWN_FOR).into()).await;
    first.start_again().await?;
    eprintln!(
        "ch-1 started again after {:.1} s down",
        killed.elapsed().as_secs_f64()
    );
    load.await??;
    let n = published.load(Ordering::Relaxed);
    assert_eq!(n, total);

    // Drained: every row on both replicas (ch-1 fetches what it missed).
    for (name, ch) in [("ch-1", &first), ("ch-2", &second)] {
        for table in ["events", "decisions"] {
            let sql = format!("SELECT count() FROM agentmesh.{table} FINAL");
            eventually(
                WAIT * 3,
                &format!("{n} rows in {table} on {name}"),
                || async { number(ch, &sql).await.filter(|c| *c >= n) },
            )
            .await?;
        }
    }
    let drained = started.elapsed();
    eprintln!(
        "drained {:.1} s after the load started: {:.0} events/s (+ as many decisions) through the failover",
        drained.as_secs_f64(),
        n as f64 / drained.as_secs_f64()
    );
    let denied = n / 10;
    assert_replica("ch-1", &first, n, denied).await?;
    assert_replica("ch-2", &second, n, denied).await?;

    // Each allowed event delivered once (the worker is not what failed, but
    // the count is the promise).
    let delivered = read_all(&js, subjects::STREAM_DELIVER).await?;
    let mut per_event: HashMap<String, u32> = HashMap::new();
    for m in &delivered {
        if let Some(id) = m.headers.as_ref().and_then(|h| h.get("ce-id")) {
            *per_event.entry(id.as_str().to_owned()).or_default() += 1;
        }
    }
    let allowed = n - 2 * denied;
    assert_eq!(
        per_event.len() as u64,
        allowed,
        "one delivery per allowed event"
    );
    assert!(
        per_event.values().all(|c| *c == 1),
        "a delivery stored twice"
    );
    eprintln!(
        "published {n}, decided {n} (allow {allowed}), delivered {}, lost 0, duplicates 0",
        delivered.len()
    );

    stop.cancel();
    sink.await??;
    worker.await??;
    Ok(())
}

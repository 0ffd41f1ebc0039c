//! Faults under load on the real distributed engines: a 3-node NATS
//! cluster (streams at three replicas) and two ClickHouse 18.16 replicas
//! coordinated by ZooKeeper (the audit tables `ReplicatedReplacingMergeTree`).
//! Two policy-worker replicas connected to different nodes, two audit-sink
//! replicas (each on another node, each writing to its own ClickHouse
//! replica first and failing over to the other), a publisher at a steady
//! rate. Mid-run the node leading `MESH_INGRESS` is killed (SIGKILL) and
//! started again, then the ClickHouse replica one sink writes to is killed
//! and started again, while the load goes on. Afterwards every published
//! event has exactly one stored receipt, every approved event exactly one
//! delivery, and on EACH ClickHouse replica, through `FINAL` and the
//! shipped queries, every event and decision once: nothing lost, nothing
//! twice. The publisher retries a publish that fails during the leader
//! election with the same `Nats-Msg-Id`, as `docs/contract.md` asks of
//! clients. Prints the election time and the time until deliveries resume
//! after the node kill, and until rows flow again after the replica kill.
//!
//! Needs ZooKeeper (`AGENTMESH_REPLICATED=1 scripts/install-deps.sh`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use e2e::WAIT;
use e2e::faults::{Progress, assert_replica, deliveries, index_of, number, publish_steadily};
use futures::StreamExt as _;
use schemas::{DecisionReceipt, subjects};
use testkit::{ClickHouseServer, NatsCluster, ZooKeeperServer, eventually, shipped_policies};
use tokio_util::sync::CancellationToken;

/// Events per second the publisher keeps up.
const RATE: u64 = 200;
/// Seconds of load before the node kill; the load goes on until both
/// faults are over and [`AFTER`] more has been published, at most
/// [`MAX_LOAD`].
const BEFORE_KILL: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(1);
const MAX_LOAD: Duration = Duration::from_secs(120);
/// How long the killed node stays down (at least until a new leader).
const DOWN: Duration = Duration::from_secs(2);
/// How long the killed ClickHouse replica stays down (at least until rows
/// flow into the other).
const CH_DOWN: Duration = Duration::from_secs(2);
/// How long the mesh may take to store everything after the load.
const DRAIN: Duration = Duration::from_secs(120);
/// The audit database (fresh servers: the default name).
const DB: &str = "agentmesh";

/// Starts a policy-worker replica in-process on `url` (its node first).
async fn start_worker(
    url: String,
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let ready = dir.join(format!("{name}.ready"));
    let config = policy_worker::Config {
        nats: broker_config::NatsArgs::url(url),
        policies: shipped_policies(),
        watch_policies: false,
        ready_file: Some(ready.clone()),
        ack_wait_secs: 5,
        grace: Duration::from_secs(1),
        stream_replicas: 3,
        ..Default::default()
    };
    let token = CancellationToken::new();
    let mut handle = tokio::spawn({
        let token = token.clone();
        let name = name.to_owned();
        async move {
            if let Err(e) = policy_worker::run(config, token).await {
                panic!("{name} failed: {e}");
            }
        }
    });
    e2e::until_started(&ready, &mut handle, name).await?;
    Ok((token, handle))
}

/// Starts an audit-sink replica in-process on NATS `url` (its node first),
/// writing to the ClickHouse replicas `clickhouse` (comma-separated, its
/// own first).
async fn start_sink(
    url: String,
    clickhouse: String,
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(
    CancellationToken,
    tokio::task::JoinHandle<Result<(), audit_sink::Error>>,
)> {
    let ready = dir.join(format!("{name}.ready"));
    let mut config = audit_sink::Config::new(url, clickhouse);
    config.database = DB.into();
    config.stream_replicas = 3;
    config.clickhouse_replicated = true;
    config.batch_period_ms = 200;
    config.insert_timeout_ms = 5_000;
    config.retry_max_ms = 1_000;
    config.ack_wait_ms = 10_000;
    config.ready_file = Some(ready.clone());
    let token = CancellationToken::new();
    let mut handle = tokio::spawn(audit_sink::run(config, token.clone()));
    e2e::until_started(&ready, &mut handle, name).await?;
    Ok((token, handle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_ingress_leader_and_a_clickhouse_replica_under_load_loses_and_repeats_nothing()
-> anyhow::Result<()> {
    let mut cluster = NatsCluster::start().await?;
    let zookeeper = ZooKeeperServer::start().await?;
    let mut ch1 = ClickHouseServer::start_replica(&zookeeper, "ch-1").await?;
    let ch2 = ClickHouseServer::start_replica(&zookeeper, "ch-2").await?;
    let admin = cluster.connect().await?;
    let js = jetstream::new(admin.clone());
    let r3 = broker_config::Options {
        replicas: 3,
        ..Default::default()
    };
    broker_config::apply(&js, &r3).await?;
    let info = js
        .get_stream(subjects::STREAM_INGRESS)
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(info.config.num_replicas, 3);

    let dir = tempfile::tempdir()?;
    // Two workers on different nodes (each list starts with its own node);
    // two sinks on the third node and the first, each writing to its own
    // ClickHouse replica first.
    let worker_a = start_worker(cluster.url_from(0), dir.path(), "worker-a").await?;
    let worker_b = start_worker(cluster.url_from(1), dir.path(), "worker-b").await?;
    let sink_a = start_sink(
        cluster.url_from(2),
        format!("{},{}", ch1.url(), ch2.url()),
        dir.path(),
        "sink-a",
    )
    .await?;
    let sink_b = start_sink(
        cluster.url_from(0),
        format!("{},{}", ch2.url(), ch1.url()),
        dir.path(),
        "sink-b",
    )
    .await?;
    for ch in [&ch1, &ch2] {
        let engine = ch
            .query_text(&format!(
                "SELECT engine FROM system.tables WHERE database = '{DB}' AND name = 'events'"
            ))
            .await?;
        assert_eq!(engine.trim(), "ReplicatedReplacingMergeTree");
    }

    let leader = cluster
        .wait_for_leader(&admin, subjects::STREAM_INGRESS, WAIT)
        .await?;
    let leader_name = cluster.name(leader).to_owned();

    // Deliveries as they are published (core subscription, from a node
    // that stays up): when did they resume after the kill?
    let observer = async_nats::ConnectOptions::new()
        .retain_servers_order()
        .connect(cluster.node_url((leader + 1) % cluster.len()).as_str())
        .await?;
    let mut delivered_live = observer.subscribe(subjects::DELIVER_ALL).await?;
    observer.flush().await?;
    let arrivals: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let observing = tokio::spawn({
        let arrivals = arrivals.clone();
        async move {
            while let Some(msg) = delivered_live.next().await {
                let index = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("ce-id"))
                    .and_then(|id| index_of(id.as_str()));
                if let Some(i) = index {
                    let mut seen = arrivals.lock().unwrap_or_else(|e| e.into_inner());
                    seen.entry(i).or_insert_with(Instant::now);
                }
            }
        }
    });

    let run = uuid::Uuid::now_v7().simple().to_string();
    let most = RATE * MAX_LOAD.as_secs();
    let progress = Arc::new(Progress::default());
    let stop_load = CancellationToken::new();
    let publisher = tokio::spawn({
        let (url, run, progress, stop) = (
            cluster.url(),
            run.clone(),
            progress.clone(),
            stop_load.clone(),
        );
        async move {
            let client = schemas::servers::connect(async_nats::ConnectOptions::new(), &url).await?;
            let mut js = jetstream::new(client);
            js.set_timeout(Duration::from_secs(2));
            publish_steadily(js, run, RATE, most, progress, stop).await
        }
    });
    let started = Instant::now();

    // 1. The node leading MESH_INGRESS.
    tokio::time::sleep(BEFORE_KILL).await;
    let first_after_kill = progress.attempted.load(Ordering::SeqCst);
    let killed_at = Instant::now();
    cluster.kill(leader);
    // Asked through the observer, whose node stays up (the admin client
    // may have been on the killed one and be reconnecting).
    let new_leader = eventually(WAIT, "a new leader of MESH_INGRESS", || async {
        NatsCluster::stream_leader(&observer, subjects::STREAM_INGRESS)
            .await
            .filter(|l| *l != leader_name)
    })
    .await?;
    let elected = killed_at.elapsed();
    // The node stays down for DOWN (the fault's length, not a wait for
    // something to happen).
    tokio::time::sleep(DOWN.saturating_sub(killed_at.elapsed())).await;
    cluster.restart(leader).await?;
    let restarted = killed_at.elapsed();

    // 2. The ClickHouse replica sink-a writes to, once it holds rows.
    eventually(WAIT, "rows on ch-1 before its kill", || async {
        number(&ch1, &format!("SELECT count() FROM {DB}.decisions"))
            .await
            .filter(|n| *n > 0)
    })
    .await?;
    let ch_kill_us = chrono::Utc::now().timestamp_micros();
    ch1.stop()?;
    let ch_killed_at = Instant::now();
    let ch_killed_after = started.elapsed();
    // Rows flow again once an event the broker received after the kill is
    // in ch-2 (sink-a failed over, sink-b writes there anyway).
    let fresh = format!("SELECT count() FROM {DB}.events WHERE received_us > {ch_kill_us}");
    eventually(WAIT, "rows on ch-2 after ch-1's kill", || async {
        number(&ch2, &fresh).await.filter(|n| *n > 0)
    })
    .await?;
    let rows_resumed = ch_killed_at.elapsed();
    tokio::time::sleep(CH_DOWN.saturating_sub(ch_killed_at.elapsed())).await;
    ch1.start_again().await?;
    let ch_restarted = ch_killed_at.elapsed();
    // Some load after both faults, then the publisher stops.
    let after = progress.published.load(Ordering::SeqCst) + RATE * AFTER.as_secs();
    eventually(WAIT, "load after both faults", || async {
        (progress.published.load(Ordering::SeqCst) >= after).then_some(())
    })
    .await?;
    stop_load.cancel();
    publisher.await??;
    let published = progress.published.load(Ordering::SeqCst);
    anyhow::ensure!(
        published < most,
        "the load ran out ({most} events) before the faults were over"
    );

    // Drain: every receipt stored, every row on both replicas (ch-1
    // fetches what it missed from ch-2).
    let counts = |table: &str| {
        format!("SELECT count() FROM (SELECT DISTINCT agent, event_id FROM {DB}.{table} FINAL)")
    };
    let drained = eventually(DRAIN, "every receipt and audit row stored", || async {
        let receipts = js
            .get_stream(subjects::STREAM_DECISION)
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .state
            .messages;
        for ch in [&ch1, &ch2] {
            for table in ["events", "decisions"] {
                if number(ch, &counts(table)).await? < published {
                    return None;
                }
            }
        }
        (receipts >= published).then_some(())
    })
    .await;
    drained.map_err(|e| {
        anyhow::anyhow!(
            "{e}; logs of n{}: {}",
            leader + 1,
            testkit::log_tail(&cluster.log_path(leader))
        )
    })?;

    for (token, _) in [&worker_a, &worker_b] {
        token.cancel();
    }
    for (token, _) in [&sink_a, &sink_b] {
        token.cancel();
    }
    worker_a.1.await?;
    worker_b.1.await?;
    sink_a.1.await??;
    sink_b.1.await??;
    observing.abort();

    // Exactly one receipt per event in MESH_DECISION.
    let receipts: Vec<DecisionReceipt> = testkit::stream_messages(&js, subjects::STREAM_DECISION)
        .await?
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect();
    let mut per_event: HashMap<&str, usize> = HashMap::new();
    for r in &receipts {
        *per_event.entry(r.event_id.as_str()).or_default() += 1;
    }
    let allowed: Vec<&str> = receipts
        .iter()
        .filter(|r| r.decision == schemas::Decision::Allow)
        .map(|r| r.event_id.as_str())
        .collect();
    // Exactly one delivery per allowed event in MESH_DELIVER.
    let delivered = deliveries(&js).await?;

    // When the first event published after the kill was delivered.
    let resumed = arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(i, _)| **i >= first_after_kill)
        .map(|(_, at)| at.saturating_duration_since(killed_at))
        .min();
    println!(
        "cluster_faults: {published} events at {RATE}/s through 2 workers and 2 sinks; \
         killed `{leader_name}` (MESH_INGRESS leader) at event {first_after_kill}; \
         new leader `{new_leader}` after {elected:?}; node restarted after {restarted:?}; \
         first delivery of an event published after the kill {resumed:?} after the kill; \
         killed ClickHouse ch-1 at {ch_killed_after:?}: rows flowing into ch-2 again {rows_resumed:?} after, ch-1 restarted after {ch_restarted:?}; \
         publish retries {}; receipts {} for {} events; deliveries {} for {} allowed",
        progress.retries.load(Ordering::Relaxed),
        receipts.len(),
        per_event.len(),
        delivered.values().sum::<u32>(),
        allowed.len(),
    );

    assert_eq!(per_event.len() as u64, published, "events with a receipt");
    assert_eq!(receipts.len() as u64, published, "receipts stored");
    let twice: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events with two receipts: {twice:?}");
    assert_eq!(
        allowed.len() as u64,
        e2e::faults::allowed(published),
        "allowed events"
    );
    let undelivered: Vec<_> = allowed
        .iter()
        .filter(|id| !delivered.contains_key(**id))
        .collect();
    assert!(
        undelivered.is_empty(),
        "allowed, never delivered: {undelivered:?}"
    );
    let repeated: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "delivered twice: {repeated:?}");
    assert_eq!(
        delivered.len(),
        allowed.len(),
        "deliveries of events not allowed"
    );
    // Each replica on its own: FINAL and the shipped queries.
    assert_replica("ch-1", &ch1, DB, published).await?;
    assert_replica("ch-2", &ch2, DB, published).await?;
    assert!(
        resumed.is_some(),
        "no delivery of an event published after the kill"
    );
    Ok(())
}

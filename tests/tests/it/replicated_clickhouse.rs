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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use e2e::WAIT;
use e2e::faults::{Progress, assert_replica, deliveries, number, publish_steadily};
use testkit::{ClickHouseServer, NatsServer, ZooKeeperServer, eventually};
use tokio_util::sync::CancellationToken;

/// Events per second the publisher keeps up.
const RATE: u64 = 150;
/// Seconds of load.
const SECS: u64 = 16;
/// When the replica the sink writes to is killed, and for how long.
const KILL_AT: Duration = Duration::from_secs(5);
const DOWN_FOR: Duration = Duration::from_secs(3);

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
    let progress = Arc::new(Progress::default());
    let load = tokio::spawn(publish_steadily(
        js.clone(),
        run,
        RATE,
        total,
        progress.clone(),
        CancellationToken::new(),
    ));
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
        progress.published.load(Ordering::Relaxed)
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
    let n = progress.published.load(Ordering::Relaxed);
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
    assert_replica("ch-1", &first, "agentmesh", n).await?;
    assert_replica("ch-2", &second, "agentmesh", n).await?;

    // Each allowed event delivered once (the worker is not what failed, but
    // the count is the promise).
    let per_event = deliveries(&js).await?;
    let allowed = e2e::faults::allowed(n);
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
        per_event.values().sum::<u32>()
    );

    stop.cancel();
    sink.await??;
    worker.await??;
    Ok(())
}

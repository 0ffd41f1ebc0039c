//! Faults under load on a real 3-node NATS cluster: the streams at three
//! replicas, two policy-worker replicas connected to different nodes, the
//! audit sink on a third, a publisher at a steady rate. The node leading
//! `MESH_INGRESS` is killed (SIGKILL) mid-run and started again while the
//! load goes on. Afterwards every published event has exactly one stored
//! receipt and one audit row (read as the shipped queries read, `FINAL`),
//! every approved event exactly one delivery: nothing lost, nothing twice.
//! The publisher retries a publish that fails during the leader election
//! with the same `Nats-Msg-Id`, as `docs/contract.md` asks of clients.
//! Prints the election time and the time until deliveries resume.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use e2e::WAIT;
use futures::StreamExt as _;
use schemas::{DecisionReceipt, subjects};
use testkit::{ClickHouseServer, NatsCluster, eventually, shipped_policies};
use tokio_util::sync::CancellationToken;

/// Events per second the publisher keeps up.
const RATE: u64 = 200;
/// Seconds of load before the kill, and after it.
const BEFORE_KILL: Duration = Duration::from_secs(2);
const TOTAL: Duration = Duration::from_secs(6);
/// How long the killed node stays down (at least until a new leader).
const DOWN: Duration = Duration::from_secs(2);
/// How long the mesh may take to store everything after the load.
const DRAIN: Duration = Duration::from_secs(120);

/// Event `i` of run `run`: 8 of 10 handoffs the shipped policies allow,
/// 1 denied `shell.exec` call, 1 invalid (source does not match subject).
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

/// The index of a `<run>-<i>` event id.
fn index_of(id: &str) -> Option<u64> {
    id.rsplit_once('-')?.1.parse().ok()
}

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
    let handle = tokio::spawn({
        let token = token.clone();
        let name = name.to_owned();
        async move {
            if let Err(e) = policy_worker::run(config, token).await {
                panic!("{name} failed: {e}");
            }
        }
    });
    eventually(WAIT, &format!("{name} to become ready"), || {
        let ready = ready.exists() || handle.is_finished();
        async move { ready.then_some(()) }
    })
    .await?;
    anyhow::ensure!(!handle.is_finished(), "{name} stopped at start");
    Ok((token, handle))
}

/// One value of a ClickHouse query (TabSeparated).
async fn scalar(ch: &ClickHouseServer, sql: &str) -> anyhow::Result<String> {
    Ok(ch.query_text(sql).await?.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_ingress_leader_under_load_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start().await?;
    let ch = ClickHouseServer::start().await?;
    let database = ch.unique_database("cluster_faults");
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
    // Two workers on different nodes (each list starts with its own node),
    // the sink on the third.
    let worker_a = start_worker(cluster.url_from(0), dir.path(), "worker-a").await?;
    let worker_b = start_worker(cluster.url_from(1), dir.path(), "worker-b").await?;
    let sink_ready = dir.path().join("sink.ready");
    let sink_config = audit_sink::Config {
        database: database.clone(),
        stream_replicas: 3,
        ready_file: Some(sink_ready.clone()),
        ..audit_sink::Config::new(cluster.url_from(2), ch.url())
    };
    let sink_token = CancellationToken::new();
    let sink = tokio::spawn(audit_sink::run(sink_config, sink_token.clone()));
    eventually(WAIT, "the audit sink to become ready", || {
        let ready = sink_ready.exists() || sink.is_finished();
        async move { ready.then_some(()) }
    })
    .await?;
    anyhow::ensure!(!sink.is_finished(), "the audit sink stopped at start");

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
    let mut deliveries = observer.subscribe(subjects::DELIVER_ALL).await?;
    observer.flush().await?;
    let arrivals: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let observing = tokio::spawn({
        let arrivals = arrivals.clone();
        async move {
            while let Some(msg) = deliveries.next().await {
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
    let total = RATE * TOTAL.as_secs();
    let attempted = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn({
        let (url, run, attempted, retries) = (
            cluster.url(),
            run.clone(),
            attempted.clone(),
            retries.clone(),
        );
        async move {
            let client = schemas::servers::connect(async_nats::ConnectOptions::new(), &url).await?;
            let mut js = jetstream::new(client);
            js.set_timeout(Duration::from_secs(2));
            let start = Instant::now();
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / RATE as f64);
                tokio::time::sleep_until(due.into()).await;
                attempted.store(i + 1, Ordering::SeqCst);
                let (subject, headers, body) = event(&run, i);
                // The client's side of the contract: retry until JetStream
                // acknowledges; the same Nats-Msg-Id makes a retry of a
                // publish that did land a no-op.
                loop {
                    let publish = PublishMessage::build()
                        .headers(headers.clone())
                        .payload(body.clone().into());
                    let stored = match js.send_publish(subject.clone(), publish).await {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    };
                    if stored {
                        break;
                    }
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            anyhow::Ok(())
        }
    });

    tokio::time::sleep(BEFORE_KILL).await;
    let first_after_kill = attempted.load(Ordering::SeqCst);
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
    tokio::time::sleep(DOWN.saturating_sub(killed_at.elapsed())).await;
    cluster.restart(leader).await?;
    let restarted = killed_at.elapsed();
    publisher.await??;
    let published = total;

    // Drain: every receipt and every audit row stored.
    let counts = "SELECT count(), uniqExact(event_id) FROM {db}.{table} FINAL FORMAT TSV";
    let expected = format!("{published}\t{published}");
    let stored = eventually(DRAIN, "every receipt and audit row stored", || async {
        let receipts = js
            .get_stream(subjects::STREAM_DECISION)
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .state
            .messages;
        let mut rows = Vec::new();
        for table in ["events", "decisions"] {
            let sql = counts.replace("{db}", &database).replace("{table}", table);
            rows.push(scalar(&ch, &sql).await.ok()?);
        }
        (receipts >= published && rows.iter().all(|r| *r == expected)).then_some(rows)
    })
    .await;
    let rows = stored.map_err(|e| {
        anyhow::anyhow!(
            "{e}; logs of n{}: {}",
            leader + 1,
            testkit::log_tail(&cluster.log_path(leader))
        )
    })?;

    worker_a.0.cancel();
    worker_b.0.cancel();
    sink_token.cancel();
    worker_a.1.await?;
    worker_b.1.await?;
    sink.await??;
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
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for m in testkit::stream_messages(&js, subjects::STREAM_DELIVER).await? {
        if let Some(id) = m.headers.get("ce-id") {
            *delivered.entry(id.as_str().to_owned()).or_default() += 1;
        }
    }

    // When the first event published after the kill was delivered.
    let resumed = arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(i, _)| **i >= first_after_kill)
        .map(|(_, at)| at.saturating_duration_since(killed_at))
        .min();
    println!(
        "cluster_faults: {published} events at {RATE}/s; killed `{leader_name}` (MESH_INGRESS leader) at event {first_after_kill}; \
         new leader `{new_leader}` after {elected:?}; node restarted after {restarted:?}; \
         first delivery of an event published after the kill {resumed:?} after the kill; \
         publish retries {}; receipts {} for {} events; deliveries {} for {} allowed; ClickHouse events, decisions (rows, distinct) {rows:?}",
        retries.load(Ordering::Relaxed),
        receipts.len(),
        per_event.len(),
        delivered.values().sum::<usize>(),
        allowed.len(),
    );

    assert_eq!(per_event.len() as u64, published, "events with a receipt");
    assert_eq!(receipts.len() as u64, published, "receipts stored");
    let twice: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events with two receipts: {twice:?}");
    assert_eq!(allowed.len() as u64, published * 8 / 10, "allowed events");
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
    assert_eq!(
        rows,
        [expected.clone(), expected],
        "ClickHouse rows (FINAL)"
    );
    assert!(
        resumed.is_some(),
        "no delivery of an event published after the kill"
    );
    Ok(())
}

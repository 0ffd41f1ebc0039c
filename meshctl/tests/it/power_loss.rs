//! Power cuts, as Jepsen tests them: the mesh (policy worker, audit sink)
//! runs under a steady load with nats-server's JetStream store and
//! ClickHouse's data directory each on a [`LazyFs`]; then the power goes:
//! the services and the servers are killed (SIGKILL) and every write not
//! yet fsynced is dropped. The servers start again on what a disk would
//! have kept, the services too, the load goes on a little, and every
//! published event is scored: **ok** (acknowledged and all there),
//! **lost** (acknowledged, and its receipt, delivery or ingress copy is
//! gone) or **unknown** (the publish got no acknowledgement: either way is
//! allowed). The audit is then checked with `meshctl audit verify`
//! (stream against table, the signed chain) and healed with
//! `meshctl audit repair`.
//!
//! With `sync_interval: always` no acknowledged event may be lost. With
//! nats-server's default (`2m`) the same test loses acknowledged events:
//! that run is opt-in (`AGENTMESH_POWER_LOSS_INTERVAL=1`, see
//! [`with_the_default_interval_a_power_cut_loses_acknowledged_events`]).
//!
//! Needs FUSE (`/dev/fuse`, root or `fusermount3`: `scripts/install-deps.sh`)
//! and a nats-server that knows `sync_interval` (2.10 or newer).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use schemas::signing::SigningKey;
use schemas::{DecisionReceipt, subjects};
use testkit::lazyfs::Dropped;
use testkit::load::{event, index_of};
use testkit::{ClickHouseServer, LazyFs, NatsCluster, NatsServer, Store, WAIT, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Events per second the publisher offers.
const RATE: u64 = 150;
/// Events acknowledged before the power cut.
const BEFORE_CUT: u64 = 300;
/// Load after the servers are back.
const AFTER: Duration = Duration::from_secs(1);
/// How long the mesh may take to work off what it holds after the load.
const DRAIN: Duration = Duration::from_secs(60);
/// The audit database (fresh servers: the default name).
const DB: &str = "agentmesh";

/// What became of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// JetStream acknowledged it.
    Acked,
    /// No acknowledgement (an error or a timeout): it may or may not be
    /// stored.
    Unknown,
}

/// The single-node mesh on power-loss filesystems.
struct Stack {
    // Fields drop in order: the servers before the filesystems they hold
    // files open on (a busy filesystem cannot be unmounted).
    broker: Broker,
    ch: ClickHouseServer,
    /// One per nats-server node.
    nats_fs: Vec<LazyFs>,
    ch_fs: LazyFs,
    /// The nodes the last power cut took down.
    cut: Vec<usize>,
    js: jetstream::Context,
    tmp: tempfile::TempDir,
    worker_key: Arc<SigningKey>,
    sink_key_file: PathBuf,
    services: Vec<JoinHandle<()>>,
    token: CancellationToken,
}

/// One nats-server, or a 3-node cluster with every stream at 3 replicas.
enum Broker {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Broker {
    fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    fn replicas(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster(_) => 3,
        }
    }

    async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        match self {
            Self::Single(server) => server.connect().await,
            Self::Cluster(cluster) => cluster.connect().await,
        }
    }

    fn options(&self) -> broker_config::Options {
        broker_config::Options {
            replicas: self.replicas(),
            ..Default::default()
        }
    }
}

impl Stack {
    /// The mesh on `nodes` nats-servers (1 or 3), each store on a
    /// [`LazyFs`] of its own, JetStream fsyncing as `sync_interval` says.
    async fn start(sync_interval: &str, nodes: usize) -> anyhow::Result<Self> {
        let nats_fs = (0..nodes)
            .map(|_| LazyFs::mount())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ch_fs = LazyFs::mount()?;
        let stores: Vec<Store> = nats_fs
            .iter()
            .map(|fs| Store {
                dir: Some(fs.path().join("jetstream")),
                sync_interval: Some(sync_interval.to_owned()),
            })
            .collect();
        let broker = if nodes == 1 {
            Broker::Single(NatsServer::start_with(stores[0].clone()).await?)
        } else {
            Broker::Cluster(NatsCluster::start_with(stores).await?)
        };
        let js = jetstream::new(broker.connect().await?);
        broker_config::apply(&js, &broker.options()).await?;
        let ch = ClickHouseServer::start_with_data_in(ch_fs.path()).await?;
        let tmp = tempfile::tempdir()?;
        let worker_key = Arc::new(SigningKey::generate());
        let sink_key = SigningKey::generate();
        trust(&js, &worker_key, "worker").await?;
        trust(&js, &sink_key, "sink").await?;
        let sink_key_file = tmp.path().join("sink.nk");
        broker_config::credentials::write_seed_file(&sink_key_file, &sink_key.seed())?;
        let mut stack = Self {
            nats_fs,
            ch_fs,
            broker,
            cut: Vec::new(),
            ch,
            js,
            tmp,
            worker_key,
            sink_key_file,
            services: Vec::new(),
            token: CancellationToken::new(),
        };
        stack.start_services().await?;
        Ok(stack)
    }

    /// The policy worker and the audit sink, in this process.
    async fn start_services(&mut self) -> anyhow::Result<()> {
        self.token = CancellationToken::new();
        let ready = self.tmp.path().join("worker.ready");
        let _ = std::fs::remove_file(&ready);
        let config = policy_worker::Config {
            nats: broker_config::NatsArgs::url(self.broker.url()),
            policies: testkit::shipped_policies(),
            watch_policies: false,
            stream_replicas: self.broker.replicas(),
            ready_file: Some(ready.clone()),
            ack_wait_secs: 2,
            grace: Duration::from_millis(200),
            signing_key: Some(self.worker_key.clone()),
            ..Default::default()
        };
        let token = self.token.clone();
        self.services.push(tokio::spawn(async move {
            if let Err(e) = policy_worker::run(config, token).await {
                eprintln!("policy worker failed: {e}");
            }
        }));
        ready_file(&ready).await?;

        let ready = self.tmp.path().join("sink.ready");
        let _ = std::fs::remove_file(&ready);
        let mut config = audit_sink::Config::new(self.broker.url(), self.ch.url());
        config.database = DB.into();
        config.stream_replicas = self.broker.replicas();
        config.batch_period_ms = 100;
        config.insert_timeout_ms = 5_000;
        config.retry_max_ms = 500;
        config.ack_wait_ms = 3_000;
        // A power cut gives no grace: on the cut the sink gives up what it
        // holds at once (unacked: redelivered after the restart).
        config.shutdown_grace_ms = 0;
        config.ready_file = Some(ready.clone());
        config.signing_key_file = Some(self.sink_key_file.clone());
        let token = self.token.clone();
        self.services.push(tokio::spawn(async move {
            if let Err(e) = audit_sink::run(config, token).await {
                eprintln!("audit sink failed: {e}");
            }
        }));
        ready_file(&ready).await
    }

    /// The power cut: the services, ClickHouse and the nats-server (on a
    /// cluster: a majority, the node leading `MESH_INGRESS` and the next)
    /// die at once, and every write they had not fsynced is gone. Returns
    /// what the nats stores and ClickHouse's directory dropped.
    async fn cut_power(&mut self) -> anyhow::Result<(Dropped, Dropped)> {
        let leader = match &self.broker {
            Broker::Single(_) => 0,
            Broker::Cluster(cluster) => {
                let client = cluster.connect().await?;
                cluster
                    .wait_for_leader(&client, subjects::STREAM_INGRESS, WAIT)
                    .await?
            }
        };
        // The services go down with the machines: their tasks (and the
        // tasks they spawned, which an abort alone would leave running)
        // stop at once; what they had not acked is redelivered.
        self.token.cancel();
        for service in self.services.drain(..) {
            service.abort();
        }
        self.cut = match &mut self.broker {
            Broker::Single(server) => {
                server.kill();
                vec![0]
            }
            Broker::Cluster(cluster) => {
                let cut = vec![leader, (leader + 1) % cluster.len()];
                for &i in &cut {
                    cluster.kill(i);
                }
                cut
            }
        };
        self.ch.stop()?;
        let mut nats = Dropped::default();
        for &i in &self.cut {
            let dropped = self.nats_fs[i].drop_unsynced();
            nats.files += dropped.files;
            nats.bytes += dropped.bytes;
        }
        Ok((nats, self.ch_fs.drop_unsynced()))
    }

    /// After the cut: the servers start on what survived, the streams are
    /// applied (as every service start does), and the services start.
    async fn restart(&mut self) -> anyhow::Result<()> {
        match &mut self.broker {
            Broker::Single(server) => server.start_again().await?,
            Broker::Cluster(cluster) => {
                for &i in &self.cut {
                    cluster.restart(i).await?;
                }
                // Each stream's Raft group elects a leader again; should
                // one not, the nodes' logs say why.
                let client = cluster.connect().await?;
                for stream in [
                    subjects::STREAM_INGRESS,
                    subjects::STREAM_DECISION,
                    subjects::STREAM_DELIVER,
                ] {
                    if let Err(e) = cluster.wait_for_leader(&client, stream, WAIT).await {
                        let logs: Vec<String> = (0..cluster.len())
                            .map(|i| {
                                format!(
                                    "{}:\n{}",
                                    cluster.name(i),
                                    testkit::log_tail(&cluster.log_path(i))
                                )
                            })
                            .collect();
                        anyhow::bail!("{e}; the nodes' logs:\n{}", logs.join("\n"));
                    }
                }
            }
        }
        self.ch.start_again().await?;
        self.js = jetstream::new(self.broker.connect().await?);
        // The buckets' streams (`KV_mesh-*`) elect their leaders after the
        // restart too; until they have, an apply times out (seen in CI:
        // `mesh-gpu-leases`). Poll it with the one deadline.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match broker_config::apply(&self.js, &self.broker.options()).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("applying the streams after the restart: {e}; again");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.start_services().await
    }

    /// `meshctl` against this stack.
    fn meshctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        cmd.args(args).current_dir(self.tmp.path());
        for var in [
            "NATS_NKEY_SEED_FILE",
            "NATS_CREDS",
            "CLICKHOUSE_USER",
            "CLICKHOUSE_PASSWORD",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NATS_URL", self.broker.url())
            .env("CLICKHOUSE_URL", self.ch.url())
            .env("AGENTMESH_AUDIT_DATABASE", DB)
            .env("AGENTMESH_HOME", self.tmp.path().join("home"));
        Ok(cmd.output()?)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.token.cancel();
        for service in &self.services {
            service.abort();
        }
    }
}

/// Trusts `key` in `mesh-signers`, as `meshctl up` does for its services.
async fn trust(js: &jetstream::Context, key: &SigningKey, name: &str) -> anyhow::Result<()> {
    let kv = js.get_key_value(subjects::BUCKET_SIGNERS).await?;
    let record = schemas::signing::SignerRecord {
        public_key: key.public_key().to_owned(),
        name: name.into(),
        status: schemas::signing::SignerStatus::Active,
        added_at: "2026-01-01T00:00:00Z".into(),
        retired_at: String::new(),
        revoked_at: String::new(),
    };
    kv.put(key.public_key(), serde_json::to_vec(&record)?.into())
        .await?;
    Ok(())
}

async fn ready_file(path: &Path) -> anyhow::Result<()> {
    eventually(WAIT, &format!("{}", path.display()), || async {
        path.exists().then_some(())
    })
    .await
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Publishes [`event`]s at [`RATE`] until `stop`, each once (no retry:
/// Jepsen's client), waiting at most 2 s for each acknowledgement; the
/// outcome of each publish in order.
async fn publish(
    url: String,
    run: String,
    outcomes: Arc<Mutex<Vec<Publish>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let options = async_nats::ConnectOptions::new().retry_on_initial_connect();
    let client = schemas::servers::connect(options, &url).await?;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    let start = Instant::now();
    for i in 0u64.. {
        if stop.is_cancelled() {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / RATE as f64);
        tokio::time::sleep_until(due.into()).await;
        let (subject, headers, body) = event(&run, i);
        let message = PublishMessage::build()
            .headers(headers)
            .payload(body.into());
        let acked = match js.send_publish(subject, message).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        let outcome = if acked {
            Publish::Acked
        } else {
            Publish::Unknown
        };
        outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(outcome);
    }
    Ok(())
}

fn acked(outcomes: &Mutex<Vec<Publish>>) -> u64 {
    outcomes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|o| **o == Publish::Acked)
        .count() as u64
}

/// Whether every consumer of the mesh's streams has worked off its stream.
async fn drained(js: &jetstream::Context) -> Option<()> {
    backlog(js).await.ok()?.is_empty().then_some(())
}

/// The consumers of the mesh's streams with messages pending or unacked.
async fn backlog(js: &jetstream::Context) -> anyhow::Result<Vec<String>> {
    use futures::StreamExt as _;
    let mut behind = Vec::new();
    for name in [subjects::STREAM_INGRESS, subjects::STREAM_DECISION] {
        let stream = js.get_stream(name).await?;
        let mut names = stream.consumer_names();
        while let Some(consumer) = names.next().await {
            let consumer = consumer?;
            let info = stream.consumer_info(&consumer).await?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                behind.push(format!(
                    "{name}/{consumer}: {} pending, {} unacked",
                    info.num_pending, info.num_ack_pending
                ));
            }
        }
    }
    Ok(behind)
}

/// The ids (`ce-id` / `event_id`) found in each place an event leaves a
/// trace.
#[derive(Debug, Default)]
struct Found {
    ingress: HashSet<String>,
    receipts: HashSet<String>,
    deliveries: HashSet<String>,
    event_rows: HashSet<String>,
    decision_rows: HashSet<String>,
}

async fn found(stack: &Stack) -> anyhow::Result<Found> {
    let ids = |stream: &'static str| async move {
        Ok::<_, anyhow::Error>(
            testkit::stream_messages(&stack.js, stream)
                .await?
                .iter()
                .filter_map(|m| m.headers.get("ce-id").map(|v| v.as_str().to_owned()))
                .collect::<HashSet<_>>(),
        )
    };
    let receipts = testkit::stream_messages(&stack.js, subjects::STREAM_DECISION)
        .await?
        .iter()
        .filter_map(|m| serde_json::from_slice::<DecisionReceipt>(&m.payload).ok())
        .map(|r| r.event_id)
        .collect();
    let rows = |table: &str| {
        let sql = format!("SELECT DISTINCT event_id FROM {DB}.{table} FINAL");
        async move {
            Ok::<_, anyhow::Error>(
                stack
                    .ch
                    .query_text(&sql)
                    .await?
                    .lines()
                    .map(str::to_owned)
                    .collect::<HashSet<_>>(),
            )
        }
    };
    Ok(Found {
        ingress: ids(subjects::STREAM_INGRESS).await?,
        receipts,
        deliveries: ids(subjects::STREAM_DELIVER).await?,
        event_rows: rows("events").await?,
        decision_rows: rows("decisions").await?,
    })
}

/// Jepsen's score of a run.
#[derive(Debug, Default)]
struct Score {
    /// Acknowledged, with ingress copy, receipt and delivery stored.
    ok: u64,
    unknown: u64,
    /// Acknowledged events with something missing, by what is missing.
    lost: BTreeMap<&'static str, Vec<u64>>,
    /// Acknowledged events whose audit rows are missing (not counted in
    /// `ok` or `lost`: that is the stream side).
    audit_missing: BTreeMap<&'static str, Vec<u64>>,
}

impl Score {
    fn lost_events(&self) -> usize {
        self.lost.values().flatten().collect::<HashSet<_>>().len()
    }

    fn audit_missing_events(&self) -> usize {
        self.audit_missing
            .values()
            .flatten()
            .collect::<HashSet<_>>()
            .len()
    }
}

fn score(run: &str, outcomes: &[Publish], found: &Found) -> Score {
    let mut score = Score::default();
    for (i, outcome) in outcomes.iter().enumerate() {
        let i = i as u64;
        if *outcome == Publish::Unknown {
            score.unknown += 1;
            continue;
        }
        let id = format!("{run}-{i}");
        let mut whole = true;
        let mut check = |ok: bool, what: &'static str, into: &mut BTreeMap<_, Vec<u64>>| {
            if !ok {
                into.entry(what).or_default().push(i);
                // The audit's rows are scored apart: ClickHouse may lose
                // them and `meshctl audit repair` restore them.
                whole &= !matches!(what, "ingress" | "receipt" | "delivery");
            }
        };
        check(found.ingress.contains(&id), "ingress", &mut score.lost);
        check(found.receipts.contains(&id), "receipt", &mut score.lost);
        // Events 0, 10, 20, … are denied and 1, 11, 21, … invalid: the
        // other eight of ten are delivered.
        check(
            i % 10 < 2 || found.deliveries.contains(&id),
            "delivery",
            &mut score.lost,
        );
        check(
            found.event_rows.contains(&id),
            "events row",
            &mut score.audit_missing,
        );
        check(
            found.decision_rows.contains(&id),
            "decisions row",
            &mut score.audit_missing,
        );
        if whole {
            score.ok += 1;
        }
    }
    score
}

/// The first few of `ids`, for a message.
fn some(ids: &[u64]) -> String {
    let shown: Vec<String> = ids.iter().take(8).map(u64::to_string).collect();
    format!(
        "{} ({}{})",
        ids.len(),
        shown.join(", "),
        if ids.len() > 8 { ", …" } else { "" }
    )
}

/// What one power-cut run saw.
struct Run {
    stack: Stack,
    run: String,
    outcomes: Vec<Publish>,
    before_repair: Score,
    dropped: (Dropped, Dropped),
}

/// Load, power cut, restart, more load, drain; scored before any repair.
async fn power_cut_run(sync_interval: &str, nodes: usize) -> anyhow::Result<Run> {
    // The services' warnings (a failed insert, a refused checkpoint) show
    // in the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let mut stack = Stack::start(sync_interval, nodes).await?;
    // The streams, buckets, consumers and tables were made long before the
    // power cut this models: the kernel's writeback has put them on disk.
    for fs in &stack.nats_fs {
        fs.sync_all();
    }
    stack.ch_fs.sync_all();
    let run = uuid::Uuid::now_v7().simple().to_string();
    let outcomes: Arc<Mutex<Vec<Publish>>> = Arc::default();
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish(
        stack.broker.url(),
        run.clone(),
        outcomes.clone(),
        stop.clone(),
    ));
    // Load until BEFORE_CUT events are acknowledged and the audit holds
    // rows (so ClickHouse has inserts to lose).
    let waited = eventually(WAIT, "acknowledged events and audit rows", || async {
        let rows = stack
            .ch
            .query_text(&format!("SELECT count() FROM {DB}.decisions"))
            .await
            .ok()?;
        let rows: u64 = rows.trim().parse().ok()?;
        (acked(&outcomes) >= BEFORE_CUT && rows > 0).then_some(())
    })
    .await;
    if let Err(e) = waited {
        let published = outcomes.lock().map(|o| o.len()).unwrap_or_default();
        let rows = stack
            .ch
            .query_text(&format!("SELECT count() FROM {DB}.decisions"))
            .await;
        anyhow::bail!(
            "{e}: {} of {published} publishes acknowledged, decisions rows: {rows:?}",
            acked(&outcomes)
        );
    }
    let dropped = stack.cut_power().await?;
    let at_cut = outcomes.lock().map(|o| o.len()).unwrap_or_default();
    stack.restart().await?;
    let back = outcomes.lock().map(|o| o.len()).unwrap_or_default();
    // Some load on the restarted mesh, then the publisher stops.
    let after = acked(&outcomes) + RATE * AFTER.as_secs();
    eventually(WAIT, "acknowledged events after the restart", || async {
        (acked(&outcomes) >= after).then_some(())
    })
    .await?;
    stop.cancel();
    publisher.await??;
    if let Err(e) = eventually(DRAIN, "the mesh worked off its streams", || {
        drained(&stack.js)
    })
    .await
    {
        anyhow::bail!("{e}: {:?}", backlog(&stack.js).await);
    }
    let outcomes = outcomes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let before_repair = score(&run, &outcomes, &found(&stack).await?);
    println!(
        "power_loss[{nodes} node(s), sync_interval {sync_interval}]: {} events published at {RATE}/s, \
         power cut after {at_cut} (nats-server{} of node(s) {:?}: {} files / {} bytes unsynced dropped; \
         ClickHouse data: {} files / {} bytes dropped), servers back by event {back}; \
         scored: ok {}, lost {}, unknown {}; lost by place: {:?}; \
         audit rows missing (before repair): {} events {:?}",
        outcomes.len(),
        if nodes > 1 { "s" } else { "" },
        stack.cut,
        dropped.0.files,
        dropped.0.bytes,
        dropped.1.files,
        dropped.1.bytes,
        before_repair.ok,
        before_repair.lost_events(),
        before_repair.unknown,
        before_repair
            .lost
            .iter()
            .map(|(k, v)| (*k, v.len()))
            .collect::<Vec<_>>(),
        before_repair.audit_missing_events(),
        before_repair
            .audit_missing
            .iter()
            .map(|(k, v)| (*k, v.len()))
            .collect::<Vec<_>>(),
    );
    Ok(Run {
        stack,
        run,
        outcomes,
        before_repair,
        dropped,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_sync_always_a_power_cut_loses_no_acknowledged_event() -> anyhow::Result<()> {
    no_acknowledged_event_lost(1).await
}

/// The same on a 3-node cluster (streams at 3 replicas): the power goes
/// on a majority, the node leading `MESH_INGRESS` and the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_sync_always_a_majority_power_cut_of_a_cluster_loses_no_acknowledged_event()
-> anyhow::Result<()> {
    no_acknowledged_event_lost(3).await
}

async fn no_acknowledged_event_lost(nodes: usize) -> anyhow::Result<()> {
    let run = power_cut_run("always", nodes).await?;
    let score = &run.before_repair;
    let lost: Vec<String> = score
        .lost
        .iter()
        .map(|(what, ids)| format!("{what} missing for {}", some(ids)))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged events lost with sync_interval always: {}",
        lost.join("; ")
    );
    assert!(score.ok > BEFORE_CUT, "ok {} events", score.ok);
    assert!(
        run.dropped.0.files > 0 || run.dropped.1.files > 0,
        "the power cut dropped nothing: the test would not see a loss"
    );
    // The audit: ClickHouse lost inserts the sink had acknowledged;
    // `meshctl audit verify` names what the streams hold and the table not,
    // `meshctl audit repair` re-inserts it, and a second repair finds
    // nothing to do.
    heal_the_audit(&run).await
}

/// Verify names the rows ClickHouse lost, repair restores them from the
/// streams (idempotently), verify is then `ok` and every acknowledged
/// event has its rows.
async fn heal_the_audit(run: &Run) -> anyhow::Result<()> {
    let stack = &run.stack;
    let missing = run.before_repair.audit_missing_events();
    let verify = stack.meshctl(&["audit", "verify"])?;
    let report = text(&verify);
    println!(
        "meshctl audit verify after the power cut: {}",
        report.lines().next().unwrap_or("")
    );
    if missing > 0 {
        assert_eq!(verify.status.code(), Some(1), "{report}");
        let named = report
            .lines()
            .filter(|l| l.contains("`meshctl audit repair` re-inserts it"))
            .count();
        assert!(
            named >= missing,
            "{missing} events lack rows, verify names {named} rows as repairable:\n{report}"
        );
    }
    let dry = stack.meshctl(&["audit", "repair", "--dry-run"])?;
    println!("meshctl audit repair --dry-run: {}", text(&dry).trim());
    let repair = stack.meshctl(&["audit", "repair"])?;
    let repaired = text(&repair);
    println!("meshctl audit repair: {}", repaired.trim());
    assert!(repair.status.success(), "{repaired}");
    if missing > 0 {
        assert!(repaired.starts_with("repaired: re-inserted"), "{repaired}");
        assert!(repaired.contains("; 0 still missing"), "{repaired}");
    }
    let again = stack.meshctl(&["audit", "repair"])?;
    assert!(
        text(&again).starts_with("nothing to repair"),
        "{}",
        text(&again)
    );
    // The same for a script: `-o json`.
    let json = stack.meshctl(&["audit", "repair", "-o", "json"])?;
    let json: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["reinserted"]["events"], 0, "{json}");
    assert_eq!(json["reinserted"]["decisions"], 0, "{json}");
    let verify = stack.meshctl(&["audit", "verify"])?;
    assert!(verify.status.success(), "{}", text(&verify));
    let after = score(&run.run, &run.outcomes, &found(stack).await?);
    assert_eq!(
        after.audit_missing_events(),
        0,
        "audit rows still missing after the repair: {:?}",
        after.audit_missing
    );
    Ok(())
}

/// The same run with nats-server's default `sync_interval` (2 minutes):
/// acknowledged events are lost, which shows the test catches the loss.
/// Opt-in: it proves the test, not the mesh (`AGENTMESH_POWER_LOSS_INTERVAL=1
/// cargo test -p meshctl --test it power_loss:: -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "opt-in: shows the loss under nats-server's default 2-minute sync interval (AGENTMESH_POWER_LOSS_INTERVAL=1)"]
async fn with_the_default_interval_a_power_cut_loses_acknowledged_events() -> anyhow::Result<()> {
    if std::env::var("AGENTMESH_POWER_LOSS_INTERVAL").as_deref() != Ok("1") {
        eprintln!("set AGENTMESH_POWER_LOSS_INTERVAL=1 to run the default-interval power cut");
        return Ok(());
    }
    let run = power_cut_run("2m", 1).await?;
    assert!(
        run.before_repair.lost_events() > 0,
        "no acknowledged event lost under a 2-minute sync interval: the power cut did not bite"
    );
    Ok(())
}

#[test]
fn scoring_tells_ok_lost_and_unknown_apart() {
    let run = "r";
    let mut found = Found::default();
    // 0: denied, whole; 2: allowed, delivery missing; 3: unknown; 4: no
    // receipt and no rows.
    for (i, sets) in [
        (0, vec!["ingress", "receipt", "rows"]),
        (2, vec!["ingress", "receipt", "rows"]),
        (4, vec!["ingress", "delivery"]),
    ] {
        let id = format!("{run}-{i}");
        for set in sets {
            match set {
                "ingress" => found.ingress.insert(id.clone()),
                "receipt" => found.receipts.insert(id.clone()),
                "delivery" => found.deliveries.insert(id.clone()),
                _ => {
                    found.event_rows.insert(id.clone());
                    found.decision_rows.insert(id.clone())
                }
            };
        }
    }
    let outcomes = [
        Publish::Acked,
        Publish::Unknown,
        Publish::Acked,
        Publish::Unknown,
        Publish::Acked,
    ];
    let score = score(run, &outcomes, &found);
    assert_eq!((score.ok, score.unknown), (1, 2));
    assert_eq!(score.lost["delivery"], [2]);
    assert_eq!(score.lost["receipt"], [4]);
    assert_eq!(score.lost_events(), 2);
    assert_eq!(score.audit_missing["events row"], [4]);
    assert_eq!(index_of("r-4"), Some(4));
}

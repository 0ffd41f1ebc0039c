//! Shared helpers for the scaler's integration tests: a broker with the mesh
//! streams, a work consumer per pool, publishing and draining backlog, and
//! reading leases and lease events back.

#![expect(
    dead_code,
    reason = "shared by several test binaries, each using a part of it"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use gpu_pools::{
    ConfigFile, DeclaredGpu, DeclaredInventory, Lease, LeaseStore, PoolConfig, SlotState,
};
use gpu_scaler::Scaler;
use gpu_scaler::events::LeaseEventData;
use tokio_util::sync::CancellationToken;

pub(crate) use testkit::Mesh;

/// `testkit`'s mesh: a fresh broker with the mesh's streams.
pub(crate) async fn mesh() -> anyhow::Result<Mesh> {
    Mesh::start().await
}

pub(crate) fn gpu_uuid(i: usize) -> String {
    format!("GPU-00000000-0000-4000-8000-{i:012}")
}

pub(crate) fn declared(n: usize) -> Vec<DeclaredGpu> {
    (0..n)
        .map(|i| DeclaredGpu {
            uuid: gpu_uuid(i),
            name: format!("declared-{i}"),
            memory_total_mib: 81920,
            healthy: true,
        })
        .collect()
}

pub(crate) fn pool(agent: &str, target: u64, min: u32, max: u32, cooldown: Duration) -> PoolConfig {
    PoolConfig {
        stream: "MESH_DELIVER".into(),
        consumers: vec![],
        subjects: vec![format!("mesh.deliver.{agent}.>")],
        target_backlog_per_gpu: target,
        min_gpus: min,
        max_gpus: max,
        cooldown,
    }
}

pub(crate) fn config(
    gpus: usize,
    interval: Duration,
    ttl: Duration,
    pools: &[(&str, PoolConfig)],
) -> ConfigFile {
    ConfigFile {
        poll_interval: interval,
        lease_ttl: ttl,
        inventory: gpu_pools::InventoryMode::Declared,
        gpus: declared(gpus),
        pools: pools
            .iter()
            .map(|(n, p)| (n.to_string(), p.clone()))
            .collect(),
    }
}

/// The durable work consumer of `agent` (as the SDK creates it).
pub(crate) async fn work_consumer(
    js: &jetstream::Context,
    agent: &str,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let stream = js.get_stream("MESH_DELIVER").await?;
    Ok(stream
        .get_or_create_consumer(
            agent,
            pull::Config {
                durable_name: Some(agent.to_owned()),
                filter_subject: format!("mesh.deliver.{agent}.>"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?)
}

pub(crate) async fn publish_work(
    js: &jetstream::Context,
    agent: &str,
    n: usize,
) -> anyhow::Result<()> {
    for i in 0..n {
        js.publish(
            format!("mesh.deliver.{agent}.planner"),
            format!("task {i}").into(),
        )
        .await?
        .await?;
    }
    Ok(())
}

/// Fetches and acknowledges (confirmed) everything pending.
pub(crate) async fn drain(consumer: &jetstream::consumer::PullConsumer) -> anyhow::Result<usize> {
    let mut done = 0;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(200))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(msg) = batch.next().await {
            msg.map_err(|e| anyhow::anyhow!(e))?
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            got += 1;
        }
        if got == 0 {
            return Ok(done);
        }
        done += got;
    }
}

/// Live leases in the bucket, by GPU.
pub(crate) async fn leases(js: &jetstream::Context) -> anyhow::Result<BTreeMap<String, Lease>> {
    let snapshot = LeaseStore::open(js).await?.snapshot().await?;
    let now = chrono::Utc::now();
    Ok(snapshot
        .slots
        .into_values()
        .filter_map(|s| match s.state {
            SlotState::Leased(l) if l.is_live(now) => Some((l.gpu.clone(), l)),
            _ => None,
        })
        .collect())
}

pub(crate) async fn leases_of(js: &jetstream::Context, pool: &str) -> anyhow::Result<Vec<Lease>> {
    Ok(leases(js)
        .await?
        .into_values()
        .filter(|l| l.pool == pool)
        .collect())
}

/// Every lease event in `MESH_GPU`, in order: (subject, type, source, data).
pub(crate) async fn lease_events(
    js: &jetstream::Context,
) -> anyhow::Result<Vec<(String, String, String, LeaseEventData)>> {
    use schemas::AttributesReader;
    let mut stream = js.get_stream("MESH_GPU").await?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let msg = stream.get_raw_message(seq).await?;
        let (event, mode) = schemas::decode(Some(&msg.headers), &msg.payload)?;
        assert_eq!(mode, schemas::ContentMode::Binary);
        let data: LeaseEventData = serde_json::from_slice(&msg.payload)?;
        out.push((
            msg.subject.to_string(),
            event.ty().to_owned(),
            event.source().to_string(),
            data,
        ));
    }
    Ok(out)
}

/// A scaler running in its own task; dropping the handle does not stop it,
/// `stop` does (gracefully) and `kill` aborts it like a crash.
pub(crate) struct Running {
    pub task: tokio::task::JoinHandle<()>,
    pub shutdown: CancellationToken,
    pub inventory: Arc<DeclaredInventory>,
}

impl Running {
    pub(crate) fn kill(&self) {
        self.task.abort();
    }
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

pub(crate) async fn scaler(
    mesh: &Mesh,
    config: &ConfigFile,
    instance: &str,
) -> anyhow::Result<(Scaler, Arc<DeclaredInventory>)> {
    let inventory = Arc::new(DeclaredInventory::new(&config.gpus));
    let scaler = Scaler::new(
        mesh.client.clone(),
        config.clone(),
        instance.to_owned(),
        inventory.clone(),
    )
    .await?;
    Ok((scaler, inventory))
}

pub(crate) async fn spawn_scaler(
    mesh: &Mesh,
    config: &ConfigFile,
    instance: &str,
) -> anyhow::Result<Running> {
    // Each scaler has its own connection, as separate processes would.
    let client = mesh.nats.connect().await?;
    let inventory = Arc::new(DeclaredInventory::new(&config.gpus));
    let scaler = Scaler::new(
        client,
        config.clone(),
        instance.to_owned(),
        inventory.clone(),
    )
    .await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(scaler.run(shutdown.clone()));
    Ok(Running {
        task,
        shutdown,
        inventory,
    })
}

//! The control loop: every `poll_interval`, read the inventory, the demand
//! and the leases, decide ([`gpu_pools::decide::plan`]), carry the plan out with
//! conditional KV writes, and report each grant and release as an event.
//!
//! The loop also answers status requests on [`STATUS_SUBJECT`] with what it
//! saw and decided last (for `meshctl gpus`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::Error;
use crate::events::{LeaseAction, Outbox, lease_event};
use gpu_pools::decide::{self, Action, PoolDecision, PoolInput, Stabilizer};
use gpu_pools::demand;
use gpu_pools::{
    ConfigFile, GpuInfo, Inventory, Lease, LeaseStore, PoolStatus, STATUS_SUBJECT, Status,
    WriteError,
};

/// How long the last events may take to reach the broker at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Leases granted.
    pub granted: usize,
    /// Leases released.
    pub released: usize,
    /// Leases renewed.
    pub renewed: usize,
    /// Conditional writes that lost to another writer.
    pub conflicts: usize,
}

/// A running scaler's state between rounds.
pub struct Scaler {
    js: jetstream::Context,
    store: LeaseStore,
    config: ConfigFile,
    instance: String,
    inventory: Arc<dyn Inventory>,
    /// The last inventory read; `None` until one read succeeded.
    last_gpus: Option<Vec<GpuInfo>>,
    stabilizers: BTreeMap<String, Stabilizer>,
    last_desired: BTreeMap<String, u32>,
    seeded: bool,
    outbox: Outbox,
    status: watch::Sender<Status>,
    _responder: AbortOnDropHandle<()>,
    metrics: Option<telemetry::ScalerMetrics>,
}

impl Scaler {
    /// A scaler for `config` named `instance` leasing the GPUs of
    /// `inventory`. The broker must already have the lease bucket and the
    /// `MESH_GPU` stream (`broker_config::apply`). Starts answering status
    /// requests at once.
    pub async fn new(
        client: async_nats::Client,
        config: ConfigFile,
        instance: String,
        inventory: Arc<dyn Inventory>,
    ) -> Result<Self, Error> {
        if !crate::is_valid_instance(&instance) {
            return Err(Error::InvalidInstance(instance));
        }
        config.validate().map_err(Error::Config)?;
        let js = jetstream::new(client.clone());
        let store = LeaseStore::open(&js).await?;
        let (status, status_rx) = watch::channel(Status {
            instance: instance.clone(),
            inventory_source: inventory.source().to_owned(),
            poll_interval_ms: config.poll_interval.as_millis() as u64,
            ..Status::default()
        });
        let subscription = client
            .subscribe(STATUS_SUBJECT)
            .await
            .map_err(|e| Error::Broker {
                what: format!("subscribing to `{STATUS_SUBJECT}`"),
                source: e.into(),
            })?;
        // The subscription must reach the server before anyone asks.
        client.flush().await.map_err(|e| Error::Broker {
            what: format!("subscribing to `{STATUS_SUBJECT}`"),
            source: e.into(),
        })?;
        let responder =
            AbortOnDropHandle::new(tokio::spawn(answer_status(client, subscription, status_rx)));
        let stabilizers = config
            .pools
            .iter()
            .map(|(name, pool)| (name.clone(), Stabilizer::new(pool.cooldown)))
            .collect();
        Ok(Self {
            js,
            store,
            config,
            instance,
            inventory,
            last_gpus: None,
            stabilizers,
            last_desired: BTreeMap::new(),
            seeded: false,
            outbox: Outbox::default(),
            status,
            _responder: responder,
            metrics: None,
        })
    }

    /// Records rounds, leases per pool and lease decisions on `metrics`.
    pub fn with_metrics(mut self, metrics: telemetry::ScalerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Runs rounds every `poll_interval` until `shutdown`, then gives the
    /// last lease events a bounded time to reach the broker. Leases are kept
    /// at shutdown: a scaler restarted under the same instance name adopts
    /// them; otherwise they lapse after `lease_ttl` and are reclaimed.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.config.poll_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The error of the last failed round: an outage is logged once when
        // it starts (or changes) and once when it ends, not every interval.
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = interval.tick() => {}
            }
            match self.round().await {
                Ok(_) => {
                    if failing.take().is_some() {
                        tracing::info!(instance = %self.instance, "Scaling rounds running again.");
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    if failing.as_deref() != Some(message.as_str()) {
                        tracing::warn!(instance = %self.instance, error = %message, "Scaling round skipped; retrying every interval.");
                    }
                    failing = Some(message);
                }
            }
        }
        if !self.outbox.is_empty() {
            let js = self.js.clone();
            if tokio::time::timeout(SHUTDOWN_GRACE, self.outbox.flush(&js))
                .await
                .is_err()
                || !self.outbox.is_empty()
            {
                tracing::warn!(
                    lost = self.outbox.len(),
                    "Terminating with lease events the broker did not acknowledge."
                );
            }
        }
        tracing::info!(instance = %self.instance, "GPU scaler stopped; leases left to lapse or to be adopted.");
    }

    /// One round: observe, decide, act, report — in a `gpu.scaling` span.
    pub async fn round(&mut self) -> Result<RoundReport, Error> {
        let span = telemetry::spans::scaling_round(&self.instance);
        let result = self.observe_decide_act().instrument(span.clone()).await;
        if let Ok(report) = &result {
            span.record("granted", report.granted);
            span.record("released", report.released);
        }
        if let Some(metrics) = &self.metrics {
            metrics.round();
        }
        result
    }

    async fn observe_decide_act(&mut self) -> Result<RoundReport, Error> {
        let started = Instant::now();
        let now = Utc::now();
        let mut errors = Vec::new();

        let inventory = Arc::clone(&self.inventory);
        match tokio::task::spawn_blocking(move || inventory.snapshot()).await {
            Ok(Ok(gpus)) => self.last_gpus = Some(gpus),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("inventory task: {e}")),
        }
        // INVARIANT: a plan is made only on an inventory that was read. On
        // none, every lease this instance holds would look gone and be
        // released.
        let Some(last_gpus) = &self.last_gpus else {
            tracing::warn!(error = %errors.join("; "), "Inventory unreadable and none seen yet; not acting this round.");
            self.status.send_modify(|s| {
                s.updated_at = now.to_rfc3339_opts(SecondsFormat::Micros, true);
                s.errors = errors;
            });
            return Ok(RoundReport::default());
        };
        if let Some(error) = errors.first() {
            tracing::warn!(%error, "Inventory unreadable; deciding on the last one seen.");
        }
        let demands = demand::read_demand(&self.js, &self.config.pools).await;
        let snapshot = self.store.snapshot().await?;
        if let Some(metrics) = &self.metrics {
            for name in self.config.pools.keys() {
                metrics.leases(name, snapshot.live_leases(Some(name), now).count() as u64);
            }
        }

        if !self.seeded {
            // What is leased now was wanted a moment ago: hold it for a
            // cooldown rather than release it on a restart.
            for (name, pool) in &self.config.pools {
                let held = snapshot.live_leases(Some(name), now).count() as u32;
                let held = held.clamp(pool.min_gpus, pool.max_gpus);
                if let Some(st) = self.stabilizers.get_mut(name) {
                    st.observe(started, held);
                }
            }
            self.seeded = true;
        }

        let mut inputs = Vec::new();
        let mut decisions = Vec::new();
        for (name, pool) in &self.config.pools {
            let backlog = match &demands[name] {
                Ok(d) => Some(d.backlog),
                Err(e) => {
                    errors.push(format!("pool `{name}`: {e}"));
                    None
                }
            };
            let raw = backlog.map(|b| decide::raw_desired(b, pool));
            let st = self
                .stabilizers
                .entry(name.clone())
                .or_insert_with(|| Stabilizer::new(pool.cooldown));
            let desired = match raw {
                Some(raw) => st.observe(started, raw),
                // Demand unknown: hold what was decided last.
                None => st
                    .current(started)
                    .or_else(|| self.last_desired.get(name).copied())
                    .unwrap_or(pool.min_gpus),
            };
            self.last_desired.insert(name.clone(), desired);
            inputs.push(PoolInput {
                pool: name.clone(),
                min: pool.min_gpus,
                desired,
                backlog: backlog.unwrap_or(0),
            });
            decisions.push((name.clone(), backlog, raw.unwrap_or(desired), desired));
        }

        let plan = decide::plan(&decide::PlanInput {
            now,
            me: &self.instance,
            ttl: self.config.lease_ttl,
            gpus: last_gpus,
            slots: &snapshot.slots,
            pools: &inputs,
        });

        let pools = decisions
            .into_iter()
            .map(|(name, backlog, raw_desired, desired)| {
                let pool = &self.config.pools[&name];
                let (demand, demand_error) = match &demands[&name] {
                    Ok(d) => (Some(d.clone()), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                PoolStatus {
                    decision: PoolDecision {
                        target: plan.targets.get(&name).copied().unwrap_or(0),
                        holding: plan.holding.get(&name).copied().unwrap_or(0),
                        pool: name,
                        backlog,
                        raw_desired,
                        desired,
                    },
                    min_gpus: pool.min_gpus,
                    max_gpus: pool.max_gpus,
                    target_backlog_per_gpu: pool.target_backlog_per_gpu,
                    cooldown_ms: pool.cooldown.as_millis() as u64,
                    demand,
                    demand_error,
                }
            })
            .collect();
        let gpus = last_gpus.clone();
        // Published before acting, so a reader who sees this round's lease
        // writes also sees the decision behind them.
        self.status.send_modify(|s| {
            s.updated_at = now.to_rfc3339_opts(SecondsFormat::Micros, true);
            s.gpus = gpus;
            s.pools = pools;
            s.errors = errors;
        });

        let report = self.execute(&plan.actions).await;
        self.outbox.flush(&self.js).await;
        let outbox = self.outbox.len();
        self.status.send_modify(|s| s.outbox = outbox);
        Ok(report)
    }

    async fn execute(&mut self, actions: &[Action]) -> RoundReport {
        let mut report = RoundReport::default();
        let mut grants_blocked = false;
        for action in actions {
            let now = Utc::now();
            match action {
                Action::Release {
                    lease,
                    revision,
                    reason,
                } => match self.store.release(&lease.gpu, *revision).await {
                    Ok(()) => {
                        tracing::info!(gpu = %lease.gpu, pool = %lease.pool, holder = %lease.holder, reason = reason.as_str(), "GPU lease released.");
                        self.emit(LeaseAction::Released(*reason), lease, now);
                        self.decided(&lease.pool, &lease.gpu, "released");
                        report.released += 1;
                    }
                    Err(e) => self.write_failed(&e, &mut report),
                },
                Action::Grant {
                    gpu,
                    pool,
                    revision,
                } => {
                    if grants_blocked {
                        continue;
                    }
                    let lease = Lease {
                        pool: pool.clone(),
                        gpu: gpu.clone(),
                        holder: self.instance.clone(),
                        granted_at: now,
                        expires_at: expiry(now, self.config.lease_ttl),
                    };
                    match self.store.grant(&lease, *revision).await {
                        Ok(_) => {
                            tracing::info!(%gpu, %pool, expires_at = %lease.expires_at, "GPU lease granted.");
                            self.emit(LeaseAction::Granted, &lease, now);
                            self.decided(pool, gpu, "granted");
                            report.granted += 1;
                        }
                        Err(e) => {
                            // Another scaler moved first: decide again on
                            // fresh state next round instead of grabbing
                            // another GPU for the same need.
                            grants_blocked = true;
                            self.write_failed(&e, &mut report);
                        }
                    }
                }
                Action::Renew { lease, revision } => {
                    let renewed = Lease {
                        expires_at: expiry(now, self.config.lease_ttl),
                        ..lease.clone()
                    };
                    match self.store.renew(&renewed, *revision).await {
                        Ok(_) => {
                            tracing::debug!(gpu = %lease.gpu, pool = %lease.pool, "GPU lease renewed.");
                            report.renewed += 1;
                        }
                        Err(e) => self.write_failed(&e, &mut report),
                    }
                }
            }
        }
        report
    }

    /// A lease decision carried out: counted, and an event on the round's span.
    fn decided(&self, pool: &str, gpu: &str, action: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.decision(pool, action);
        }
        telemetry::spans::scaling_decision(pool, gpu, action);
    }

    fn write_failed(&self, e: &WriteError, report: &mut RoundReport) {
        match e {
            WriteError::Conflict(key) => {
                tracing::debug!(gpu = %key, "Lease changed by another writer; deciding again next round.");
                report.conflicts += 1;
            }
            WriteError::Broker { .. } => tracing::warn!(error = %e, "Lease write failed."),
        }
    }

    fn emit(&mut self, action: LeaseAction, lease: &Lease, now: DateTime<Utc>) {
        match lease_event(&self.instance, action, lease, now) {
            Ok(event) => self.outbox.push(&lease.pool, event),
            Err(e) => {
                tracing::error!(error = %e, gpu = %lease.gpu, "Lease event could not be built.")
            }
        }
    }
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(15))
}

async fn answer_status(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    status: watch::Receiver<Status>,
) {
    while let Some(request) = requests.next().await {
        let Some(reply) = request.reply else { continue };
        // INVARIANT: `Status` is plain data, so serialising cannot fail.
        let body = serde_json::to_vec(&*status.borrow()).unwrap_or_default();
        if let Err(e) = client.publish(reply, body.into()).await {
            tracing::debug!(error = %e, "Status reply not sent.");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use gpu_pools::{
        DeclaredGpu, DeclaredInventory, InventoryError, InventoryMode, PoolConfig, SlotState,
    };

    /// Declared GPUs whose reads fail while `failing` is set, as NVML can.
    struct Flaky {
        gpus: DeclaredInventory,
        failing: AtomicBool,
    }

    impl Inventory for Flaky {
        fn source(&self) -> &'static str {
            "declared"
        }

        fn snapshot(&self) -> Result<Vec<GpuInfo>, InventoryError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(InventoryError::Nvml("transient".into()));
            }
            self.gpus.snapshot()
        }
    }

    fn config() -> ConfigFile {
        let pool = PoolConfig {
            stream: "MESH_DELIVER".into(),
            consumers: vec![],
            subjects: vec!["mesh.deliver.coder.>".into()],
            target_backlog_per_gpu: 10,
            min_gpus: 1,
            max_gpus: 1,
            cooldown: Duration::from_secs(60),
        };
        ConfigFile {
            poll_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(15),
            inventory: InventoryMode::Declared,
            gpus: vec![DeclaredGpu {
                uuid: "GPU-00000000-0000-4000-8000-000000000000".into(),
                name: "declared-0".into(),
                memory_total_mib: 81920,
                healthy: true,
            }],
            pools: [("coder".to_owned(), pool)].into_iter().collect(),
        }
    }

    async fn held_by(js: &jetstream::Context, instance: &str) -> usize {
        let snapshot = LeaseStore::open(js)
            .await
            .unwrap()
            .snapshot()
            .await
            .unwrap();
        snapshot
            .slots
            .values()
            .filter(|s| matches!(&s.state, SlotState::Leased(l) if l.holder == instance && l.is_live(Utc::now())))
            .count()
    }

    #[tokio::test]
    async fn a_restart_with_an_unreadable_inventory_keeps_its_leases() {
        let server = testkit::NatsServer::start().await.unwrap();
        let client = server.connect().await.unwrap();
        let js = jetstream::new(client.clone());
        broker_config::apply(&js, &broker_config::Options::default())
            .await
            .unwrap();
        let config = config();
        let inventory = Arc::new(Flaky {
            gpus: DeclaredInventory::new(&config.gpus),
            failing: AtomicBool::new(false),
        });

        let mut first = Scaler::new(
            client.clone(),
            config.clone(),
            "scaler-a".into(),
            inventory.clone(),
        )
        .await
        .unwrap();
        assert_eq!(first.round().await.unwrap().granted, 1, "min_gpus = 1");
        drop(first);

        // Restarted under the same name while NVML fails: nothing is known
        // of the GPUs, so nothing is released.
        inventory.failing.store(true, Ordering::SeqCst);
        let mut restarted = Scaler::new(client, config, "scaler-a".into(), inventory.clone())
            .await
            .unwrap();
        let report = restarted.round().await.unwrap();
        assert_eq!(report.released, 0);
        assert_eq!(held_by(&js, "scaler-a").await, 1);

        // Once read, the inventory still has the GPU and the lease is kept.
        inventory.failing.store(false, Ordering::SeqCst);
        let report = restarted.round().await.unwrap();
        assert_eq!((report.released, report.granted), (0, 0));
        assert_eq!(held_by(&js, "scaler-a").await, 1);
    }
}

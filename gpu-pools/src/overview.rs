//! GPUs at a glance (what `meshctl gpus` prints): each running scaler's
//! inventory and per-pool demand, answered on `mesh.gpu.status`, and the
//! leases read straight from the bucket.
//!
//! With no scaler answering, a config file still gives the pools' demand
//! (read from JetStream here) and the declared GPUs.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::Error;
use crate::config::{ConfigFile, DisplayDuration};
use crate::decide;
use crate::demand;
use crate::inventory::{DeclaredInventory, GpuInfo, Inventory};
use crate::lease::{LeaseStore, SlotState};
use crate::status::{STATUS_SUBJECT, Status};

/// One row of the lease table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// GPU uuid.
    pub gpu: String,
    /// Pool.
    pub pool: String,
    /// Holder instance.
    pub holder: String,
    /// Granted at.
    pub granted_at: DateTime<Utc>,
    /// Expires at.
    pub expires_at: DateTime<Utc>,
}

/// Demand of one pool computed here from a config (no scaler answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPool {
    /// Pool name.
    pub pool: String,
    /// Backlog, or the error reading it.
    pub backlog: Result<u64, String>,
    /// Desired GPUs for this backlog (no cooldown applied).
    pub desired: u32,
    /// `min_gpus`, `max_gpus`, `target_backlog_per_gpu`.
    pub bounds: (u32, u32, u64),
}

/// Everything `meshctl gpus` shows.
#[derive(Debug, Clone)]
pub struct Overview {
    /// Status of each scaler that answered.
    pub scalers: Vec<Status>,
    /// Live leases in the bucket.
    pub leases: Vec<LeaseRow>,
    /// Leases past their expiry, not yet reclaimed.
    pub lapsed: Vec<LeaseRow>,
    /// With no scaler answering: the config's declared GPUs.
    pub declared: Vec<GpuInfo>,
    /// With no scaler answering: demand computed from the config.
    pub local_pools: Vec<LocalPool>,
    /// When it was read.
    pub at: DateTime<Utc>,
}

impl Overview {
    /// Live leases of `pool`.
    pub fn leases_of(&self, pool: &str) -> usize {
        self.leases.iter().filter(|l| l.pool == pool).count()
    }
}

/// Gathers the overview: asks the scalers (answers collected for `wait`),
/// reads the leases, and, if no scaler answered and `config` is given,
/// computes demand from it.
pub async fn gather(
    client: &async_nats::Client,
    config: Option<&ConfigFile>,
    wait: Duration,
) -> Result<Overview, Error> {
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::broker("subscribing for status", e))?;
    client
        .publish_with_reply(STATUS_SUBJECT, inbox, "".into())
        .await
        .map_err(|e| Error::broker("asking for status", e))?;
    client
        .flush()
        .await
        .map_err(|e| Error::broker("asking for status", e))?;
    let mut scalers = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if let Ok(status) = serde_json::from_slice::<Status>(&msg.payload) {
            scalers.push(status);
        }
    }
    scalers.sort_by(|a, b| a.instance.cmp(&b.instance));

    let js = jetstream::new(client.clone());
    let snapshot = LeaseStore::open(&js).await?.snapshot().await?;
    let at = Utc::now();
    let (mut leases, mut lapsed) = (Vec::new(), Vec::new());
    for slot in snapshot.slots.values() {
        if let SlotState::Leased(l) = &slot.state {
            let row = LeaseRow {
                gpu: l.gpu.clone(),
                pool: l.pool.clone(),
                holder: l.holder.clone(),
                granted_at: l.granted_at,
                expires_at: l.expires_at,
            };
            if l.is_live(at) {
                leases.push(row)
            } else {
                lapsed.push(row)
            }
        }
    }
    leases.sort_by(|a, b| (&a.pool, &a.gpu).cmp(&(&b.pool, &b.gpu)));

    let (mut declared, mut local_pools) = (Vec::new(), Vec::new());
    if let (true, Some(config)) = (scalers.is_empty(), config) {
        declared = DeclaredInventory::new(&config.gpus)
            .snapshot()
            .unwrap_or_default();
        let demands = demand::read_demand(&js, &config.pools).await;
        for (name, pool) in &config.pools {
            let backlog = match &demands[name] {
                Ok(d) => Ok(d.backlog),
                Err(e) => Err(e.to_string()),
            };
            local_pools.push(LocalPool {
                pool: name.clone(),
                desired: backlog
                    .as_ref()
                    .map_or(0, |b| decide::raw_desired(*b, pool)),
                backlog,
                bounds: (pool.min_gpus, pool.max_gpus, pool.target_backlog_per_gpu),
            });
        }
    }
    Ok(Overview {
        scalers,
        leases,
        lapsed,
        declared,
        local_pools,
        at,
    })
}

fn short_time(t: DateTime<Utc>) -> String {
    t.format("%H:%M:%S%.3f").to_string()
}

fn seconds_until(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{:.1}s", (t - now).num_milliseconds() as f64 / 1000.0)
}

fn write_gpus(f: &mut fmt::Formatter<'_>, gpus: &[GpuInfo]) -> fmt::Result {
    if gpus.is_empty() {
        return writeln!(f, "  (no GPUs)");
    }
    writeln!(
        f,
        "  {:<44} {:<26} {:>19} {:>5}  HEALTH",
        "UUID", "NAME", "MEMORY (MiB)", "UTIL"
    )?;
    for g in gpus {
        let memory = match g.memory_used_mib {
            Some(used) => format!("{used}/{}", g.memory_total_mib),
            None => format!("-/{}", g.memory_total_mib),
        };
        let util = g
            .utilization_percent
            .map_or("-".to_owned(), |u| format!("{u}%"));
        let health = if g.healthy {
            "ok".to_owned()
        } else {
            format!("UNHEALTHY ({})", g.problem.as_deref().unwrap_or("unknown"))
        };
        writeln!(
            f,
            "  {:<44} {:<26} {:>19} {:>5}  {health}",
            g.uuid, g.name, memory, util
        )?;
    }
    Ok(())
}

impl fmt::Display for Overview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scalers.is_empty() {
            writeln!(f, "No GPU scaler answered on `{STATUS_SUBJECT}`.")?;
            if !self.declared.is_empty() || !self.local_pools.is_empty() {
                writeln!(f, "\nDeclared GPUs (from the config):")?;
                write_gpus(f, &self.declared)?;
            }
        }
        for s in &self.scalers {
            writeln!(
                f,
                "GPUs of scaler `{}` ({}, every {}, last round {}):",
                s.instance,
                s.inventory_source,
                DisplayDuration(Duration::from_millis(s.poll_interval_ms)),
                s.updated_at
            )?;
            write_gpus(f, &s.gpus)?;
            for e in &s.errors {
                writeln!(f, "  ! {e}")?;
            }
            if s.outbox > 0 {
                writeln!(f, "  ! {} lease events waiting for the broker", s.outbox)?;
            }
        }

        writeln!(f, "\nLeases ({} live):", self.leases.len())?;
        if self.leases.is_empty() && self.lapsed.is_empty() {
            writeln!(f, "  (none)")?;
        } else {
            writeln!(
                f,
                "  {:<44} {:<16} {:<20} {:<13} EXPIRES IN",
                "GPU", "POOL", "HOLDER", "GRANTED"
            )?;
            for l in &self.leases {
                writeln!(
                    f,
                    "  {:<44} {:<16} {:<20} {:<13} {}",
                    l.gpu,
                    l.pool,
                    l.holder,
                    short_time(l.granted_at),
                    seconds_until(l.expires_at, self.at)
                )?;
            }
            for l in &self.lapsed {
                writeln!(
                    f,
                    "  {:<44} {:<16} {:<20} {:<13} lapsed {} ago",
                    l.gpu,
                    l.pool,
                    l.holder,
                    short_time(l.granted_at),
                    seconds_until(self.at, l.expires_at)
                )?;
            }
        }

        writeln!(f, "\nPools:")?;
        writeln!(
            f,
            "  {:<16} {:>8} {:>8} {:>4} {:>4} {:>8} {:>7} {:>7} {:>9}",
            "POOL", "BACKLOG", "PER GPU", "MIN", "MAX", "DESIRED", "TARGET", "LEASED", "COOLDOWN"
        )?;
        let mut any = false;
        for s in &self.scalers {
            for p in &s.pools {
                any = true;
                let d = &p.decision;
                let backlog = d.backlog.map_or("?".to_owned(), |b| b.to_string());
                writeln!(
                    f,
                    "  {:<16} {:>8} {:>8} {:>4} {:>4} {:>8} {:>7} {:>7} {:>9}",
                    d.pool,
                    backlog,
                    p.target_backlog_per_gpu,
                    p.min_gpus,
                    p.max_gpus,
                    d.desired,
                    d.target,
                    self.leases_of(&d.pool),
                    DisplayDuration(Duration::from_millis(p.cooldown_ms)).to_string()
                )?;
                if let Some(e) = &p.demand_error {
                    writeln!(f, "    ! {e}")?;
                }
                if let Some(missing) = p
                    .demand
                    .as_ref()
                    .map(|d| &d.missing)
                    .filter(|m| !m.is_empty())
                {
                    writeln!(f, "    ! consumers not found: {}", missing.join(", "))?;
                }
            }
        }
        if self.scalers.is_empty() {
            for p in &self.local_pools {
                any = true;
                let backlog = p.backlog.as_ref().map_or("?".to_owned(), |b| b.to_string());
                writeln!(
                    f,
                    "  {:<16} {:>8} {:>8} {:>4} {:>4} {:>8} {:>7} {:>7} {:>9}",
                    p.pool,
                    backlog,
                    p.bounds.2,
                    p.bounds.0,
                    p.bounds.1,
                    p.desired,
                    "-",
                    self.leases_of(&p.pool),
                    "-"
                )?;
                if let Err(e) = &p.backlog {
                    writeln!(f, "    ! {e}")?;
                }
            }
        }
        if !any {
            writeln!(
                f,
                "  (no scaler answered; pass the scaler's config to compute demand here)"
            )?;
        }
        Ok(())
    }
}

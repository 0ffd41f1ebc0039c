//! What a running scaler answers on `mesh.gpu.status` (JSON): its
//! inventory and its last decision per pool. `meshctl gpus` reads it.

use serde::{Deserialize, Serialize};

use crate::decide::PoolDecision;
use crate::demand::PoolDemand;
use crate::inventory::GpuInfo;

/// Core NATS subject on which every running scaler answers with its [`Status`] (JSON).
pub const STATUS_SUBJECT: &str = schemas::subjects::GPU_STATUS;

/// One pool in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Decision figures.
    #[serde(flatten)]
    pub decision: PoolDecision,
    /// `min_gpus`.
    pub min_gpus: u32,
    /// `max_gpus`.
    pub max_gpus: u32,
    /// `target_backlog_per_gpu`.
    pub target_backlog_per_gpu: u64,
    /// `cooldown` in milliseconds.
    pub cooldown_ms: u64,
    /// Where the backlog came from.
    pub demand: Option<PoolDemand>,
    /// Why the backlog could not be read.
    pub demand_error: Option<String>,
}

/// What a scaler saw and decided in its last round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The instance name.
    pub instance: String,
    /// `nvml` or `declared`.
    pub inventory_source: String,
    /// When the round ran (RFC 3339), empty before the first.
    pub updated_at: String,
    /// Poll interval in milliseconds.
    pub poll_interval_ms: u64,
    /// The GPUs.
    pub gpus: Vec<GpuInfo>,
    /// The pools.
    pub pools: Vec<PoolStatus>,
    /// Lease events waiting for the broker.
    pub outbox: usize,
    /// What went wrong in the round, if anything.
    pub errors: Vec<String>,
}

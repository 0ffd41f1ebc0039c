//! The GPU pools as the scaler and `meshctl gpus` both see them: the pools
//! file ([`ConfigFile`]), each pool's demand read from JetStream
//! (`demand`), the I/O-free scaling decision (`decide`), the leases in the
//! `mesh-gpu-leases` bucket with their conditional writes ([`LeaseStore`]),
//! the GPUs ([`GpuInfo`], the declared inventory), what a running scaler
//! answers on `mesh.gpu.status` ([`Status`]) and the overview `meshctl
//! gpus` prints (`overview`). The scaler service (`gpu-scaler`) adds NVML,
//! the rounds, the lease events and its health server around them.

mod config;
pub mod decide;
pub mod demand;
mod inventory;
mod lease;
pub mod overview;
mod status;

pub use config::{
    ConfigError, ConfigFile, DEFAULT_COOLDOWN, DEFAULT_LEASE_TTL, DEFAULT_POLL_INTERVAL,
    DEFAULT_STREAM, DeclaredGpu, DisplayDuration, InventoryMode, PoolConfig, parse_duration,
};
pub use inventory::{DeclaredInventory, GpuInfo, Inventory, InventoryError};
pub use lease::{Lease, LeaseStore, Slot, SlotState, Snapshot, WriteError, slot_from_entry};
pub use status::{PoolStatus, STATUS_SUBJECT, Status};

/// Why the broker could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A broker request failed.
    #[error("{what}: {source}")]
    Broker {
        /// What was being done.
        what: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
}

impl Error {
    /// A failed broker request: `what` was being done.
    pub(crate) fn broker(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self::Broker {
            what: what.into(),
            source: source.into(),
        }
    }
}

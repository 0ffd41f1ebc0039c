//! The GPU scaler: reads each agent pool's backlog from JetStream, decides
//! how many GPUs the pool needs, and leases GPUs to it in the
//! `mesh-gpu-leases` KV bucket — one key per GPU, every write conditional on
//! the revision read, so no GPU is ever leased twice even with several
//! scalers running. Every grant and release is a CloudEvent on
//! `mesh.gpu.lease.<pool>`.
//!
//! Workers learn their GPUs with [`watch_pool`]; operators see everything
//! with [`overview::gather`] (`meshctl gpus`). `docs/gpu-scaler.md` explains
//! the config, the decision and the fair-sharing rule.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

mod config;
pub mod decide;
pub mod demand;
pub mod events;
pub mod inventory;
mod lease;
pub mod overview;
mod scaler;
mod worker;

pub use config::{
    Config, ConfigError, DEFAULT_COOLDOWN, DEFAULT_LEASE_TTL, DEFAULT_POLL_INTERVAL,
    DEFAULT_STREAM, DeclaredGpu, DisplayDuration, InventoryMode, PoolConfig, parse_duration,
};
pub use inventory::{DeclaredInventory, GpuInfo, Inventory, InventoryError, NvmlInventory};
pub use lease::{Lease, LeaseStore, Slot, SlotState, Snapshot};
pub use scaler::{PoolStatus, RoundReport, STATUS_SUBJECT, Scaler, Status};
pub use worker::{AssignedGpu, assigned_gpus, cuda_visible_devices, watch_pool};

/// Why the scaler (or a helper) could not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The NATS server could not be reached.
    #[error("connecting to NATS at `{url}`: {message}")]
    Connect {
        /// The URL tried.
        url: String,
        /// The client's message.
        message: String,
    },
    /// A broker request failed.
    #[error("{what}: {message}")]
    Broker {
        /// What was being done.
        what: String,
        /// The broker's answer.
        message: String,
    },
    /// Streams and buckets could not be set up.
    #[error(transparent)]
    Apply(#[from] broker_config::ApplyError),
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The inventory could not be opened.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// The instance name cannot be used in a CloudEvents source.
    #[error("instance name `{0}` is invalid: use letters, digits, `.`, `_` or `-` (at most 64)")]
    InvalidInstance(String),
    /// The health and metrics server or the OTLP exporter could not start.
    #[error(transparent)]
    Telemetry(#[from] telemetry::Error),
    /// The ready file could not be written.
    #[error("ready file `{path}`: {source}")]
    ReadyFile {
        /// The path.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Everything the `gpu-scaler` binary runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NATS server URL.
    pub nats_url: String,
    /// How to authenticate to NATS (none by default).
    pub credentials: broker_config::NatsCredentials,
    /// The parsed config file.
    pub config: Config,
    /// This instance's name: the lease holder and the event source.
    pub instance: String,
    /// File created once the first round has run, removed on exit.
    pub ready_file: Option<PathBuf>,
    /// Replicas of the MESH_* streams when they are created or updated (3 on
    /// a 3-node cluster; every service must say the same).
    pub stream_replicas: usize,
    /// Health and metrics server, OTLP export (off by default).
    pub ops: telemetry::OpsConfig,
}

/// Whether `name` can name an instance: `[A-Za-z0-9._-]{1,64}`.
pub fn is_valid_instance(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The default instance name: the host name (invalid characters replaced),
/// or `gpu-scaler`. Two scalers on one host need `--instance` each.
pub fn default_instance() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "gpu-scaler".to_owned()
    } else {
        name
    }
}

/// Runs the scaler until `shutdown`: connects, applies the broker config,
/// opens the inventory, runs a first round, writes the ready file, then
/// runs rounds every `poll_interval`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    // First, so /healthz answers while the scaler starts.
    let ops = telemetry::Ops::start("gpu-scaler", &settings.ops).await?;
    let running = ops.health().flag("rounds", false);
    let options = settings
        .credentials
        .apply(async_nats::ConnectOptions::new().name("gpu-scaler"))
        .await
        .map_err(|e| Error::Connect {
            url: settings.nats_url.clone(),
            message: e.to_string(),
        })?;
    let client = options
        .connect(&settings.nats_url)
        .await
        .map_err(|e| Error::Connect {
            url: settings.nats_url.clone(),
            message: e.to_string(),
        })?;
    let state = client.clone();
    ops.health().probe("nats", move || {
        state.connection_state() == async_nats::connection::State::Connected
    });
    let js = async_nats::jetstream::new(client.clone());
    let broker = broker_config::Options {
        replicas: settings.stream_replicas.max(1),
        ..broker_config::Options::default()
    };
    broker_config::apply(&js, &broker).await?;
    let inventory: Arc<dyn Inventory> = inventory::open(&settings.config)?;
    let pools = settings.config.pools.len();
    let mut scaler = Scaler::new(client, settings.config, settings.instance, inventory)
        .await?
        .with_metrics(telemetry::ScalerMetrics::new(ops.metrics()));
    if let Err(e) = scaler.round().await {
        tracing::warn!(error = %e, "First scaling round failed; retrying every interval.");
    }
    let _ready = match &settings.ready_file {
        Some(path) => Some(ReadyFile::create(path.clone())?),
        None => None,
    };
    running.set(true);
    tracing::info!(instance = %scaler.instance(), pools, "GPU scaler ready.");
    scaler.run(shutdown).await;
    running.set(false);
    ops.shutdown().await;
    Ok(())
}

/// A file that exists while the scaler runs.
struct ReadyFile(PathBuf);

impl ReadyFile {
    fn create(path: PathBuf) -> Result<Self, Error> {
        std::fs::write(&path, b"ready\n").map_err(|source| Error::ReadyFile {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self(path))
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

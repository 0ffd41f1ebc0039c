//! The GPU scaler: reads each agent pool's backlog from JetStream, decides
//! how many GPUs the pool needs, and leases GPUs to it in the
//! `mesh-gpu-leases` KV bucket — one key per GPU, every write conditional on
//! the revision read, so no GPU is ever leased twice even with several
//! scalers running. Every grant and release is a CloudEvent on
//! `mesh.gpu.lease.<pool>`.
//!
//! Workers learn their GPUs with [`watch_pool`]; operators see everything
//! with `gpu_pools::overview::gather` (`meshctl gpus`). `docs/gpu-scaler.md` explains
//! the config, the decision and the fair-sharing rule.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub mod events;
pub mod inventory;
mod scaler;
mod worker;

use gpu_pools::{ConfigError, ConfigFile, Inventory, InventoryError};
pub use inventory::NvmlInventory;
pub use scaler::{RoundReport, Scaler};
pub use worker::{AssignedGpu, assigned_gpus, cuda_visible_devices, watch_pool};

/// Why the scaler (or a helper) could not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service skeleton could not start: the health server, the NATS
    /// connection or the ready file.
    #[error(transparent)]
    Start(#[from] telemetry::StartError),
    /// A broker request failed.
    #[error("{what}: {source}")]
    Broker {
        /// What was being done.
        what: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
    /// Leases or status could not be read.
    #[error(transparent)]
    Pools(#[from] gpu_pools::Error),
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
}

/// Default replicas of the `MESH_*` streams.
pub const DEFAULT_STREAM_REPLICAS: usize = 1;

/// Everything the scaler runs with: the `gpu-scaler` flags (and the
/// environment variables named), or [`Config::default`] and struct update
/// syntax in tests. The pools themselves are in the file `--config` names
/// ([`ConfigFile`]).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "gpu-scaler",
    version,
    about = "Leases GPUs to agent pools from their JetStream backlog"
)]
pub struct Config {
    /// NATS URL and credentials.
    #[command(flatten)]
    pub nats: broker_config::NatsArgs,
    /// Pools config file (TOML, or JSON for a `.json` file); without one
    /// there are no pools and nothing is leased.
    #[arg(long = "config", env = "GPU_SCALER_CONFIG")]
    pub pools_file: Option<PathBuf>,
    /// File created once the scaler is ready, removed on exit.
    #[arg(long, env = "GPU_SCALER_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Instance name: lease holder and event source (default: the host name).
    #[arg(long, env = "GPU_SCALER_INSTANCE")]
    pub instance: Option<String>,
    /// Replicas of the MESH_* streams when they are created or updated (3 on
    /// a 3-node cluster; every service must say the same).
    #[arg(long, env = "AGENTMESH_STREAM_REPLICAS", default_value_t = DEFAULT_STREAM_REPLICAS)]
    pub stream_replicas: usize,
    /// Days events are kept in the `MESH_*` streams (their `max_age`; `MESH_AUDIT` is kept for good). Unset: a stream this service creates gets 7 days and an existing one keeps what it has; every service should say the same.
    #[arg(long, env = "AGENTMESH_STREAM_MAX_AGE_DAYS")]
    pub stream_max_age_days: Option<u64>,
    /// Health and metrics server, log format, OTLP export.
    #[command(flatten)]
    pub ops: telemetry::OpsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: broker_config::NatsArgs::default(),
            pools_file: None,
            ready_file: None,
            instance: None,
            stream_replicas: DEFAULT_STREAM_REPLICAS,
            stream_max_age_days: None,
            ops: telemetry::OpsConfig::default(),
        }
    }
}

impl Config {
    /// The pools of `--config`; none (and a warning) without one.
    pub fn pools(&self) -> Result<ConfigFile, ConfigError> {
        match &self.pools_file {
            Some(path) => ConfigFile::load(path),
            None => {
                tracing::warn!("No --config given: no pools, nothing will be leased.");
                Ok(ConfigFile::default())
            }
        }
    }

    /// This instance's name: `--instance`, or [`default_instance`].
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(default_instance)
    }
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
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    // First, so /healthz answers while the scaler starts.
    let mut ops = telemetry::Service::start("gpu-scaler", &config.ops).await?;
    let pools_config = config.pools()?;
    let running = ops.health().flag("rounds", false);
    let client = ops.connect(&config.nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    let broker = broker_config::Options {
        replicas: config.stream_replicas.max(1),
        ..broker_config::Options::default()
    }
    .with_max_age_days(config.stream_max_age_days);
    broker_config::apply(&js, &broker).await?;
    let inventory: Arc<dyn Inventory> = inventory::open(&pools_config)?;
    let pools = pools_config.pools.len();
    let mut scaler = Scaler::new(client, pools_config, config.instance(), inventory)
        .await?
        .with_metrics(telemetry::ScalerMetrics::new(ops.metrics()));
    if let Err(e) = scaler.round().await {
        tracing::warn!(error = %e, "First scaling round failed; retrying every interval.");
    }
    ops.ready(config.ready_file.as_deref())?;
    running.set(true);
    tracing::info!(instance = %scaler.instance(), pools, "GPU scaler ready.");
    scaler.run(shutdown).await;
    running.set(false);
    ops.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_keep_their_names_and_defaults_match_default() {
        let config = Config::try_parse_from([
            "gpu-scaler",
            "--nats-url",
            "nats://n:4222",
            "--config",
            "/pools.toml",
            "--instance",
            "gpu-host-1",
            "--stream-replicas",
            "3",
        ])
        .unwrap();
        assert_eq!(config.nats.url, "nats://n:4222");
        assert_eq!(config.pools_file, Some(PathBuf::from("/pools.toml")));
        assert_eq!(config.instance(), "gpu-host-1");
        assert_eq!(config.stream_replicas, 3);
        if std::env::var_os("AGENTMESH_STREAM_REPLICAS").is_none() {
            let plain = Config::try_parse_from(["gpu-scaler"]).unwrap();
            assert_eq!(plain.stream_replicas, Config::default().stream_replicas);
        }
        if std::env::var_os("GPU_SCALER_CONFIG").is_none() {
            assert_eq!(Config::default().pools().unwrap(), ConfigFile::default());
        }
    }
}

//! `meshctl gpus`: GPU inventory, leases and per-pool demand at a glance.
//!
//! Running scalers answer on `mesh.gpu.status` with their inventory and
//! their last decision per pool; the leases are read from the
//! `mesh-gpu-leases` bucket itself. With no scaler answering, the scaler's
//! config file (if given) still yields each pool's backlog and desired GPUs.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

/// How long answers from running scalers are collected.
const STATUS_WAIT: Duration = Duration::from_millis(300);

/// Prints inventory, leases and per-pool demand. `config` is the scaler's
/// pools file, used only when no scaler answers.
pub(crate) async fn run(
    endpoints: &crate::servers::Endpoints,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    let config = config.map(gpu_pools::ConfigFile::load).transpose()?;
    let client = endpoints
        .connect_nats()
        .await
        .context("is the mesh up? `meshctl up`")?;
    let overview = gpu_pools::overview::gather(&client, config.as_ref(), STATUS_WAIT).await?;
    print!("{overview}");
    Ok(())
}

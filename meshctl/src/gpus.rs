//! `meshctl gpus`: GPU inventory, leases and per-pool demand at a glance.
//!
//! Running scalers answer on `mesh.gpu.status` with their inventory and
//! their last decision per pool; the leases are read from the
//! `mesh-gpu-leases` bucket itself. With no scaler answering, the scaler's
//! config file (if given) still yields each pool's backlog and desired GPUs.

use std::path::Path;
use std::time::Duration;

/// How long answers from running scalers are collected.
const STATUS_WAIT: Duration = Duration::from_millis(300);

/// Prints inventory, leases and per-pool demand. `config` is the scaler's
/// pools file, used only when no scaler answers.
pub(crate) async fn run(
    endpoints: &crate::servers::Endpoints,
    config: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let config = config.map(gpu_pools::ConfigFile::load).transpose()?;
    let client = endpoints.connect_nats().await?;
    let overview = gpu_pools::overview::gather(&client, config.as_ref(), STATUS_WAIT).await?;
    if json {
        let lease = |l: &gpu_pools::overview::LeaseRow| {
            serde_json::json!({
                "gpu": l.gpu,
                "pool": l.pool,
                "holder": l.holder,
                "granted_at": l.granted_at.to_rfc3339(),
                "expires_at": l.expires_at.to_rfc3339(),
            })
        };
        let pools: Vec<serde_json::Value> = overview
            .local_pools
            .iter()
            .map(|p| {
                serde_json::json!({
                    "pool": p.pool,
                    "backlog": p.backlog.as_ref().ok(),
                    "backlog_error": p.backlog.as_ref().err(),
                    "desired": p.desired,
                    "min_gpus": p.bounds.0,
                    "max_gpus": p.bounds.1,
                    "target_backlog_per_gpu": p.bounds.2,
                })
            })
            .collect();
        return crate::output::print_json(&serde_json::json!({
            "at": overview.at.to_rfc3339(),
            "scalers": overview.scalers,
            "leases": overview.leases.iter().map(lease).collect::<Vec<_>>(),
            "lapsed": overview.lapsed.iter().map(lease).collect::<Vec<_>>(),
            "declared": overview.declared,
            "local_pools": pools,
        }));
    }
    out!("{overview}");
    Ok(())
}

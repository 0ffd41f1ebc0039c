//! The NVML path on a real NVIDIA GPU: discovery (uuid, name, memory,
//! utilisation, health) and a lease on the real uuid. That test needs a GPU,
//! so it is `#[ignore]`d and counts as skipped in an ordinary run;
//! `scripts/gpu-check.sh` (and `scripts/test.sh` on a host whose
//! `nvidia-smi` answers) runs it with `--ignored`, where a missing GPU fails
//! it. Where NVML is absent the fallback to the declared GPUs is checked.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use gpu_pools::{ConfigFile, Inventory, InventoryMode};
use gpu_scaler::{NvmlInventory, assigned_gpus, cuda_visible_devices};

#[tokio::test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu-check.sh runs it"]
async fn nvml_discovers_real_gpus_and_the_scaler_leases_one() -> anyhow::Result<()> {
    let nvml = NvmlInventory::open().map_err(|e| {
        anyhow::anyhow!(
            "no NVIDIA GPU here ({e}): this test runs where libnvidia-ml.so.1 loads (scripts/gpu-check.sh)"
        )
    })?;
    let gpus = nvml.snapshot()?;
    anyhow::ensure!(!gpus.is_empty(), "NVML loaded but sees no GPU");
    println!(
        "NVML driver {:?}, {} GPU(s):",
        nvml.driver_version(),
        gpus.len()
    );
    for gpu in &gpus {
        println!(
            "  #{:?} {} `{}` memory {:?}/{} MiB utilisation {:?}% healthy {} {:?}",
            gpu.index,
            gpu.uuid,
            gpu.name,
            gpu.memory_used_mib,
            gpu.memory_total_mib,
            gpu.utilization_percent,
            gpu.healthy,
            gpu.problem
        );
        assert!(
            gpu.uuid.starts_with("GPU-") || gpu.uuid.starts_with("MIG-"),
            "{}",
            gpu.uuid
        );
        assert!(!gpu.name.is_empty());
        assert!(gpu.memory_total_mib > 0);
        assert!(
            gpu.memory_used_mib
                .is_some_and(|u| u <= gpu.memory_total_mib)
        );
        assert!(gpu.utilization_percent.is_none_or(|u| u <= 100));
        assert!(gpu.index.is_some());
    }
    let auto = gpu_scaler::inventory::open(&ConfigFile::default())?;
    assert_eq!(auto.source(), "nvml", "auto mode picks NVML where it loads");

    // A lease on the real GPU (scripts/gpu-check.sh installs nats-server).
    testkit::nats_server_binary()?;
    let mesh = common::mesh().await?;
    let mut config = common::config(
        0,
        Duration::from_millis(250),
        Duration::from_secs(15),
        &[(
            "gpu-check",
            common::pool("gpu-check", 10, 1, 1, Duration::from_secs(60)),
        )],
    );
    config.inventory = InventoryMode::Nvml;
    let mut scaler = gpu_scaler::Scaler::new(
        mesh.client.clone(),
        config,
        "nvml-check".into(),
        Arc::new(nvml),
    )
    .await?;
    let report = scaler.round().await?;
    assert_eq!(report.granted, 1, "min_gpus = 1 leases one real GPU");
    let assigned = assigned_gpus(&mesh.js, "gpu-check").await?;
    let healthy: Vec<_> = gpus.iter().filter(|g| g.healthy).collect();
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].uuid, healthy[0].uuid);
    println!(
        "leased: CUDA_VISIBLE_DEVICES={}",
        cuda_visible_devices(&assigned)
    );
    Ok(())
}

#[test]
fn without_nvml_auto_mode_uses_the_declared_gpus() -> anyhow::Result<()> {
    if NvmlInventory::open().is_ok() {
        println!("SKIPPED: NVML is present here; the fallback is for hosts without it");
        return Ok(());
    }
    let mut config = ConfigFile {
        gpus: common::declared(2),
        ..ConfigFile::default()
    };
    let inventory = gpu_scaler::inventory::open(&config)?;
    assert_eq!(inventory.source(), "declared");
    assert_eq!(inventory.snapshot()?.len(), 2);
    config.inventory = InventoryMode::Nvml;
    let err = gpu_scaler::inventory::open(&config)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("NVML is not available"), "{err}");
    Ok(())
}

//! The GPUs a scaler may lease, as the scaler and `meshctl gpus` see them:
//! one GPU's state ([`GpuInfo`]), where an inventory comes from
//! ([`Inventory`]), and the GPUs declared in the config for hosts without
//! NVML (and tests). NVML itself is the scaler's (`gpu_scaler::NvmlInventory`).
//!
//! A GPU is healthy while NVML answers for it and it has no memory pages
//! pending retirement; a GPU NVML saw before and no longer sees is reported
//! unhealthy ("disappeared"), so its lease is released and it is not leased
//! again until it is back and healthy.

use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::DeclaredGpu;

/// One GPU as the inventory sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Unique id (`GPU-…` from NVML); the lease key and the value for `CUDA_VISIBLE_DEVICES`.
    pub uuid: String,
    /// NVML index, when discovered by NVML.
    pub index: Option<u32>,
    /// Product name.
    pub name: String,
    /// Total memory in MiB.
    pub memory_total_mib: u64,
    /// Memory in use in MiB, when known.
    pub memory_used_mib: Option<u64>,
    /// GPU utilisation in percent over the last sample period, when known.
    pub utilization_percent: Option<u32>,
    /// Whether it may be leased.
    pub healthy: bool,
    /// Why it is not healthy.
    pub problem: Option<String>,
}

/// Why the inventory could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// NVML did not load or initialise.
    #[error("NVML is not available: {0}")]
    NvmlUnavailable(String),
    /// NVML loaded but a query failed for all devices.
    #[error("NVML query failed: {0}")]
    Nvml(String),
}

/// A source of GPUs.
pub trait Inventory: Send + Sync + 'static {
    /// `nvml` or `declared`.
    fn source(&self) -> &'static str;
    /// The GPUs now, healthy or not. May block briefly (NVML calls).
    fn snapshot(&self) -> Result<Vec<GpuInfo>, InventoryError>;
}

/// GPUs declared in the config, whose health can be changed at run time
/// (tests and operators mark a GPU unhealthy or remove it).
#[derive(Debug, Default)]
pub struct DeclaredInventory {
    gpus: Mutex<Vec<GpuInfo>>,
}

impl DeclaredInventory {
    /// The inventory of these declared GPUs.
    pub fn new(declared: &[DeclaredGpu]) -> Self {
        let gpus = declared
            .iter()
            .map(|d| GpuInfo {
                uuid: d.uuid.clone(),
                index: None,
                name: if d.name.is_empty() {
                    "declared".to_owned()
                } else {
                    d.name.clone()
                },
                memory_total_mib: d.memory_total_mib,
                memory_used_mib: None,
                utilization_percent: None,
                healthy: d.healthy,
                problem: (!d.healthy).then(|| "declared unhealthy".to_owned()),
            })
            .collect();
        Self {
            gpus: Mutex::new(gpus),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<GpuInfo>> {
        // A panic while holding this lock cannot leave the list half-written
        // (every change is one assignment), so a poisoned lock is still usable.
        self.gpus
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks `uuid` healthy or not; false when no such GPU is declared.
    pub fn set_healthy(&self, uuid: &str, healthy: bool) -> bool {
        let mut gpus = self.lock();
        match gpus.iter_mut().find(|g| g.uuid == uuid) {
            Some(gpu) => {
                gpu.healthy = healthy;
                gpu.problem = (!healthy).then(|| "marked unhealthy".to_owned());
                true
            }
            None => false,
        }
    }

    /// Removes `uuid` (the GPU disappears); false when no such GPU is declared.
    pub fn remove(&self, uuid: &str) -> bool {
        let mut gpus = self.lock();
        let before = gpus.len();
        gpus.retain(|g| g.uuid != uuid);
        gpus.len() != before
    }
}

impl Inventory for DeclaredInventory {
    fn source(&self) -> &'static str {
        "declared"
    }

    fn snapshot(&self) -> Result<Vec<GpuInfo>, InventoryError> {
        Ok(self.lock().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_health_and_removal() {
        let inv = DeclaredInventory::new(&[
            DeclaredGpu {
                uuid: "GPU-a".into(),
                name: String::new(),
                memory_total_mib: 1024,
                healthy: true,
            },
            DeclaredGpu {
                uuid: "GPU-b".into(),
                name: "b".into(),
                memory_total_mib: 0,
                healthy: false,
            },
        ]);
        let gpus = inv.snapshot().unwrap();
        assert_eq!(gpus[0].name, "declared");
        assert!(gpus[0].healthy && !gpus[1].healthy);
        assert!(inv.set_healthy("GPU-a", false));
        assert!(!inv.snapshot().unwrap()[0].healthy);
        assert!(!inv.set_healthy("GPU-x", false));
        assert!(inv.remove("GPU-b"));
        assert_eq!(inv.snapshot().unwrap().len(), 1);
    }
}

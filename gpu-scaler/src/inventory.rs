//! The GPUs a scaler may lease: discovered with NVML where the NVIDIA driver
//! is present, or declared in the config for hosts without one (and tests).
//!
//! A GPU is healthy while NVML answers for it and it has no memory pages
//! pending retirement; a GPU NVML saw before and no longer sees is reported
//! unhealthy ("disappeared"), so its lease is released and it is not leased
//! again until it is back and healthy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigFile, DeclaredGpu, InventoryMode};

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

/// GPUs discovered through NVML (`libnvidia-ml.so.1`).
pub struct NvmlInventory {
    nvml: Nvml,
    /// Every GPU seen so far by uuid, so one that vanishes is reported.
    seen: Mutex<BTreeMap<String, GpuInfo>>,
}

impl NvmlInventory {
    /// Loads and initialises NVML.
    pub fn open() -> Result<Self, InventoryError> {
        let nvml = Nvml::init().map_err(|e| InventoryError::NvmlUnavailable(e.to_string()))?;
        Ok(Self {
            nvml,
            seen: Mutex::new(BTreeMap::new()),
        })
    }

    /// The driver version NVML reports.
    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    fn read_device(&self, index: u32) -> Result<GpuInfo, NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        let uuid = device.uuid()?;
        let name = device.name().unwrap_or_default();
        let memory = device.memory_info()?;
        let utilization = match device.utilization_rates() {
            Ok(u) => Some(u.gpu),
            Err(NvmlError::NotSupported) => None,
            Err(e) => return Err(e),
        };
        let pending_retirement = matches!(device.are_pages_pending_retired(), Ok(true));
        Ok(GpuInfo {
            uuid,
            index: Some(index),
            name,
            memory_total_mib: memory.total / (1024 * 1024),
            memory_used_mib: Some(memory.used / (1024 * 1024)),
            utilization_percent: utilization,
            healthy: !pending_retirement,
            problem: pending_retirement.then(|| "memory pages pending retirement".to_owned()),
        })
    }
}

impl Inventory for NvmlInventory {
    fn source(&self) -> &'static str {
        "nvml"
    }

    fn snapshot(&self) -> Result<Vec<GpuInfo>, InventoryError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| InventoryError::Nvml(e.to_string()))?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut now: BTreeMap<String, GpuInfo> = BTreeMap::new();
        let mut failed = Vec::new();
        for index in 0..count {
            match self.read_device(index) {
                Ok(info) => {
                    now.insert(info.uuid.clone(), info);
                }
                Err(e) => failed.push((index, e.to_string())),
            }
        }
        // A device NVML still counts but cannot read (fallen off the bus,
        // GPU_IS_LOST) keeps the uuid it had at that index, now unhealthy.
        for (index, problem) in failed {
            if let Some(previous) = seen
                .values()
                .find(|g| g.index == Some(index) && !now.contains_key(&g.uuid))
            {
                let mut info = previous.clone();
                info.healthy = false;
                info.problem = Some(problem);
                info.memory_used_mib = None;
                info.utilization_percent = None;
                now.insert(info.uuid.clone(), info);
            }
        }
        for (uuid, previous) in seen.iter() {
            if !now.contains_key(uuid) {
                let mut info = previous.clone();
                info.healthy = false;
                info.problem = Some("disappeared".to_owned());
                info.memory_used_mib = None;
                info.utilization_percent = None;
                now.insert(uuid.clone(), info);
            }
        }
        for (uuid, info) in &now {
            if info.problem.as_deref() != Some("disappeared") {
                seen.insert(uuid.clone(), info.clone());
            }
        }
        let mut gpus: Vec<GpuInfo> = now.into_values().collect();
        gpus.sort_by_key(|g| (g.index.unwrap_or(u32::MAX), g.uuid.clone()));
        Ok(gpus)
    }
}

/// Opens the inventory the config asks for. In `auto` mode a missing NVML is
/// one log line and the declared GPUs are used; in `nvml` mode it is an error.
pub fn open(config: &ConfigFile) -> Result<Arc<dyn Inventory>, InventoryError> {
    let declared = || Arc::new(DeclaredInventory::new(&config.gpus)) as Arc<dyn Inventory>;
    match config.inventory {
        InventoryMode::Declared => Ok(declared()),
        InventoryMode::Nvml => {
            let nvml = NvmlInventory::open()?;
            let count = nvml.snapshot()?.len();
            tracing::info!(gpus = count, driver = ?nvml.driver_version(), "GPU inventory from NVML.");
            Ok(Arc::new(nvml))
        }
        InventoryMode::Auto => match NvmlInventory::open() {
            Ok(nvml) => match nvml.snapshot() {
                Ok(gpus) if !gpus.is_empty() => {
                    tracing::info!(gpus = gpus.len(), driver = ?nvml.driver_version(), "GPU inventory from NVML.");
                    Ok(Arc::new(nvml))
                }
                Ok(_) => {
                    tracing::info!(
                        declared = config.gpus.len(),
                        "NVML sees no GPU; using the GPUs declared in the config."
                    );
                    Ok(declared())
                }
                Err(e) => {
                    tracing::info!(reason = %e, declared = config.gpus.len(), "NVML unusable; using the GPUs declared in the config.");
                    Ok(declared())
                }
            },
            Err(e) => {
                tracing::info!(reason = %e, declared = config.gpus.len(), "NVML not available; using the GPUs declared in the config.");
                Ok(declared())
            }
        },
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

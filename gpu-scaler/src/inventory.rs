//! The GPUs a scaler may lease: discovered with NVML where the NVIDIA driver
//! is present, or declared in the config for hosts without one (and tests).
//!
//! A GPU is healthy while NVML answers for it and it has no memory pages
//! pending retirement; a GPU NVML saw before and no longer sees is reported
//! unhealthy ("disappeared"), so its lease is released and it is not leased
//! again until it is back and healthy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use gpu_pools::{ConfigFile, DeclaredInventory, GpuInfo, Inventory, InventoryError, InventoryMode};

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

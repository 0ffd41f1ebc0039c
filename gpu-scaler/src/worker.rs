//! For workers: which GPUs their pool holds, as a stream that yields the set
//! at once and again whenever it changes — a grant, a release, or a lease
//! lapsing unrenewed.
//!
//! ```no_run
//! # async fn demo(js: async_nats::jetstream::Context) -> Result<(), gpu_scaler::Error> {
//! use futures::StreamExt;
//! let mut gpus = Box::pin(gpu_scaler::watch_pool(&js, "coder").await?);
//! while let Some(Ok(assigned)) = gpus.next().await {
//!     let visible = gpu_scaler::cuda_visible_devices(&assigned);
//!     println!("CUDA_VISIBLE_DEVICES={visible}");
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::Error;
use gpu_pools::{LeaseStore, Slot, SlotState, slot_from_entry};

/// Pause before re-reading the bucket after the watch broke.
const REWATCH_DELAY: Duration = Duration::from_millis(250);

/// A GPU leased to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedGpu {
    /// The GPU uuid (`GPU-…`): a valid `CUDA_VISIBLE_DEVICES` entry.
    pub uuid: String,
    /// The pool.
    pub pool: String,
    /// The scaler instance holding the lease.
    pub holder: String,
    /// When it was granted.
    pub granted_at: DateTime<Utc>,
    /// When it lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// The value for `CUDA_VISIBLE_DEVICES`: the uuids, comma-separated.
pub fn cuda_visible_devices(gpus: &[AssignedGpu]) -> String {
    gpus.iter()
        .map(|g| g.uuid.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The GPUs leased to `pool` now (from one read of the bucket).
pub async fn assigned_gpus(js: &jetstream::Context, pool: &str) -> Result<Vec<AssignedGpu>, Error> {
    let store = LeaseStore::open(js).await?;
    let snapshot = store.snapshot().await?;
    Ok(assigned(&snapshot.slots, pool, Utc::now()))
}

fn assigned(slots: &BTreeMap<String, Slot>, pool: &str, now: DateTime<Utc>) -> Vec<AssignedGpu> {
    slots
        .values()
        .filter_map(|slot| match &slot.state {
            SlotState::Leased(l) if l.pool == pool && l.is_live(now) => Some(AssignedGpu {
                uuid: l.gpu.clone(),
                pool: l.pool.clone(),
                holder: l.holder.clone(),
                granted_at: l.granted_at,
                expires_at: l.expires_at,
            }),
            _ => None,
        })
        .collect()
}

struct WatchState {
    store: LeaseStore,
    pool: String,
    slots: BTreeMap<String, Slot>,
    watch: Option<kv::Watch>,
    last: Option<Vec<AssignedGpu>>,
}

/// Watches the lease bucket for `pool`: the first item is the current set,
/// each later one the new set after a change (uuid order). A broken watch
/// yields one error and resumes from a fresh read of the bucket.
pub async fn watch_pool(
    js: &jetstream::Context,
    pool: &str,
) -> Result<impl Stream<Item = Result<Vec<AssignedGpu>, Error>> + Send + 'static, Error> {
    let store = LeaseStore::open(js).await?;
    let mut state = WatchState {
        store,
        pool: pool.to_owned(),
        slots: BTreeMap::new(),
        watch: None,
        last: None,
    };
    state.resync().await?;
    Ok(futures::stream::unfold(state, |mut state| async move {
        let item = state.next_change().await;
        Some((item, state))
    }))
}

impl WatchState {
    /// Reads the whole bucket, then watches from the revision after it.
    async fn resync(&mut self) -> Result<(), Error> {
        let snapshot = self.store.snapshot().await?;
        let watch = self
            .store
            .kv()
            .watch_all_from_revision(snapshot.revision + 1)
            .await
            .map_err(|e| Error::Broker {
                what: "watching the lease bucket".to_owned(),
                source: e.into(),
            })?;
        self.slots = snapshot.slots;
        self.watch = Some(watch);
        Ok(())
    }

    async fn next_change(&mut self) -> Result<Vec<AssignedGpu>, Error> {
        loop {
            let now = Utc::now();
            let current = assigned(&self.slots, &self.pool, now);
            if self.last.as_ref() != Some(&current) {
                self.last = Some(current.clone());
                return Ok(current);
            }
            let next_expiry = current.iter().map(|g| g.expires_at).min();
            let sleep = match next_expiry {
                // Wake just after the earliest lease lapses.
                Some(t) => (t - now).to_std().unwrap_or_default() + Duration::from_millis(1),
                None => Duration::from_secs(3600),
            };
            let Some(watch) = self.watch.as_mut() else {
                tokio::time::sleep(REWATCH_DELAY).await;
                self.resync().await?;
                continue;
            };
            tokio::select! {
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => {
                        let slot = slot_from_entry(&entry);
                        let newer = self.slots.get(&slot.gpu).is_none_or(|s| s.revision < slot.revision);
                        if newer {
                            self.slots.insert(slot.gpu.clone(), slot);
                        }
                    }
                    other => {
                        self.watch = None;
                        let source: async_nats::Error = match other {
                            Some(Err(e)) => e.into(),
                            _ => "watch ended".into(),
                        };
                        return Err(Error::Broker { what: "watching the lease bucket".to_owned(), source });
                    }
                },
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}

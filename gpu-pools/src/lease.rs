//! Leases in the `mesh-gpu-leases` KV bucket: one key per GPU (its uuid),
//! the value a JSON [`Lease`] (`schemas::gpu::Lease`, the wire type), a
//! delete marker when free.
//!
//! Every write is conditional on the revision the writer read (`create`
//! expects no live value, `update` and `delete` the exact last revision), so
//! of two writers that read the same state only one succeeds: a GPU can never
//! be leased twice.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
pub use schemas::gpu::Lease;

use crate::Error;

/// What one key of the bucket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Deleted or purged: the GPU is free.
    Free,
    /// A lease (live or expired).
    Leased(Lease),
    /// A value that is not a lease; left alone and never leased over.
    Unreadable(String),
}

/// One key of the bucket with the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The GPU uuid.
    pub gpu: String,
    /// The revision of the last write (the delete marker's for a free slot).
    pub revision: u64,
    /// What it holds.
    pub state: SlotState,
}

/// Every key of the bucket at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The slots by GPU uuid.
    pub slots: BTreeMap<String, Slot>,
    /// The bucket's last revision when it was listed; watch from the next.
    pub revision: u64,
}

impl Snapshot {
    /// The live leases of `pool` at `now`, by GPU uuid.
    pub fn live_leases<'a>(
        &'a self,
        pool: Option<&'a str>,
        now: DateTime<Utc>,
    ) -> impl Iterator<Item = &'a Lease> + 'a {
        self.slots
            .values()
            .filter_map(move |slot| match &slot.state {
                SlotState::Leased(l) if l.is_live(now) && pool.is_none_or(|p| l.pool == p) => {
                    Some(l)
                }
                _ => None,
            })
    }
}

/// Why a conditional write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Someone else wrote the key since it was read; re-read and decide again.
    #[error("key `{0}` changed since it was read")]
    Conflict(String),
    /// The broker did not take the write.
    #[error("writing key `{key}`: {source}")]
    Broker {
        /// The key.
        key: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
}

/// The lease bucket.
#[derive(Clone)]
pub struct LeaseStore {
    kv: kv::Store,
}

impl LeaseStore {
    /// Opens the `mesh-gpu-leases` bucket (created by `broker_config::apply`).
    pub async fn open(js: &jetstream::Context) -> Result<Self, Error> {
        let bucket = schemas::subjects::BUCKET_GPU_LEASES;
        let kv = js.get_key_value(bucket).await.map_err(|e| {
            Error::broker(
                format!("opening KV bucket `{bucket}` (run `broker_config::apply` first)"),
                e,
            )
        })?;
        Ok(Self { kv })
    }

    /// The underlying KV store.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// Reads every key: lists the keys (one stream info), then reads each.
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        let filter = format!("{}>", self.kv.prefix);
        let mut listing = self
            .kv
            .stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| Error::broker("listing lease keys", e))?;
        let revision = listing.info.state.last_sequence;
        let mut keys = Vec::new();
        while let Some((subject, _count)) = listing
            .try_next()
            .await
            .map_err(|e| Error::broker("listing lease keys", e))?
        {
            if let Some(key) = subject.strip_prefix(self.kv.prefix.as_str()) {
                keys.push(key.to_owned());
            }
        }
        let entries = futures::stream::iter(keys)
            .map(|key| async move { (key.clone(), self.kv.entry(key).await) })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let mut slots = BTreeMap::new();
        for (key, entry) in entries {
            let entry = entry.map_err(|e| Error::broker(format!("reading lease `{key}`"), e))?;
            if let Some(entry) = entry {
                let slot = slot_from_entry(&entry);
                slots.insert(slot.gpu.clone(), slot);
            }
        }
        Ok(Snapshot { slots, revision })
    }

    /// Writes a new lease where the key is free: `revision` is the delete
    /// marker's (0 for a key never written), or `None` to re-read it first.
    pub async fn grant(&self, lease: &Lease, revision: Option<u64>) -> Result<u64, WriteError> {
        let value = encode(lease);
        match revision {
            Some(revision) => self
                .kv
                .update(&lease.gpu, value, revision)
                .await
                .map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        WriteError::Conflict(lease.gpu.clone())
                    } else {
                        broker_error(&lease.gpu, e)
                    }
                }),
            None => self.kv.create(&lease.gpu, value).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    WriteError::Conflict(lease.gpu.clone())
                } else {
                    broker_error(&lease.gpu, e)
                }
            }),
        }
    }

    /// Replaces the lease read at `revision` with `lease` (a renewal).
    pub async fn renew(&self, lease: &Lease, revision: u64) -> Result<u64, WriteError> {
        self.grant(lease, Some(revision)).await
    }

    /// Frees the GPU if the key is still at `revision`.
    pub async fn release(&self, gpu: &str, revision: u64) -> Result<(), WriteError> {
        self.kv
            .delete_expect_revision(gpu, Some(revision))
            .await
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    WriteError::Conflict(gpu.to_owned())
                } else {
                    broker_error(gpu, e)
                }
            })
    }
}

fn broker_error(key: &str, e: impl Into<async_nats::Error>) -> WriteError {
    WriteError::Broker {
        key: key.to_owned(),
        source: e.into(),
    }
}

/// The slot one KV entry describes.
pub fn slot_from_entry(entry: &kv::Entry) -> Slot {
    let state = match entry.operation {
        kv::Operation::Delete | kv::Operation::Purge => SlotState::Free,
        kv::Operation::Put => match serde_json::from_slice::<Lease>(&entry.value) {
            Ok(lease) if lease.gpu == entry.key => SlotState::Leased(lease),
            Ok(lease) => SlotState::Unreadable(format!(
                "lease names gpu `{}` under key `{}`",
                lease.gpu, entry.key
            )),
            Err(e) => SlotState::Unreadable(e.to_string()),
        },
    };
    Slot {
        gpu: entry.key.clone(),
        revision: entry.revision,
        state,
    }
}

fn encode(lease: &Lease) -> Bytes {
    // INVARIANT: a `Lease` is strings only, so serialising cannot fail.
    Bytes::from(serde_json::to_vec(lease).unwrap_or_default())
}

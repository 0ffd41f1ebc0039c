//! Verifying deliveries (`docs/contract.md`, "Signed decisions"): every
//! delivery carries the deciding policy worker's Ed25519 signature over
//! the event's attributes, its decision and the SHA-256 of its payload.
//! The agent checks it against the trusted signers in `mesh-signers`
//! before any handler sees the event; one that fails is refused, logged,
//! counted ([`AgentMetrics::refused`](crate::AgentMetrics::refused)) and
//! acknowledged, so it never loops.
//!
//! The signer records are read when the agent connects and kept current by
//! a subscription on the bucket's subjects (a revocation applies at once);
//! an unknown signer makes the agent read the bucket again before it
//! refuses, so a signer the operator just added is trusted.
//!
//! A delivery signed per event carries `Mesh-Signature`; one signed in a
//! batch carries the batch's root, its inclusion proof and the root's
//! signature (`Mesh-Batch-*`). Batch roots whose signature verified are
//! remembered ([`VerifiedRoots`]), so the other deliveries of the same
//! batch cost a few SHA-256s, not an Ed25519 verification.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use schemas::MeshEvent;
use schemas::signing::{Refused, SignerRecord, Signers, VerifiedRoots};
use schemas::subjects;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The least time between two reads of the whole bucket for an unknown
/// signer.
const REREAD_EVERY: Duration = Duration::from_millis(500);

/// The trusted signers, as this agent last read them.
#[derive(Debug)]
pub(crate) struct Trust {
    signers: RwLock<Signers>,
    /// Batch roots verified already.
    roots: VerifiedRoots,
    kv: Option<kv::Store>,
    last_read: Mutex<Option<Instant>>,
}

impl Trust {
    /// Reads `mesh-signers` and follows its changes. Without the bucket
    /// (a mesh older than signed decisions) no signer is trusted.
    pub(crate) async fn open(js: &jetstream::Context) -> Arc<Self> {
        let kv = match js.get_key_value(subjects::BUCKET_SIGNERS).await {
            Ok(kv) => Some(kv),
            Err(error) => {
                tracing::warn!(bucket = subjects::BUCKET_SIGNERS, %error, "Cannot open the trusted signers; every signed delivery will be refused (switch verification off with `verify_deliveries(false)` on a mesh without them).");
                None
            }
        };
        let trust = Arc::new(Self {
            signers: RwLock::new(Signers::default()),
            roots: VerifiedRoots::default(),
            kv,
            last_read: Mutex::new(None),
        });
        if let Some(kv) = &trust.kv {
            // Subscribe first, so no change between the read and the
            // subscription is missed.
            let changes = js.client().subscribe(format!("{}>", kv.prefix)).await.ok();
            trust.reread(true).await;
            if let Some(changes) = changes {
                tokio::spawn(follow(Arc::downgrade(&trust), changes, kv.prefix.clone()));
            }
        }
        trust
    }

    /// Reads every record again (at most every [`REREAD_EVERY`] unless `force`).
    async fn reread(&self, force: bool) {
        let Some(kv) = &self.kv else { return };
        let mut last = self.last_read.lock().await;
        if !force && last.is_some_and(|t| t.elapsed() < REREAD_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        match read_all(kv).await {
            Ok(records) => {
                if let Ok(mut signers) = self.signers.write() {
                    *signers = Signers::new(records);
                }
            }
            Err(error) => {
                tracing::warn!(bucket = subjects::BUCKET_SIGNERS, %error, "Reading the trusted signers failed; keeping the last set.");
            }
        }
    }

    fn check(
        &self,
        event: &MeshEvent,
        h: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<(), Refused> {
        match self.signers.read() {
            Ok(signers) => signers.verify_delivery_cached(event, h, payload, Some(&self.roots)),
            Err(_) => Err(Refused::Missing("signers")),
        }
    }

    /// Verifies a delivery; an unknown signer is looked up once more.
    pub(crate) async fn verify(
        &self,
        event: &MeshEvent,
        h: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<(), Refused> {
        match self.check(event, h, payload) {
            Err(Refused::UnknownSigner(_)) => {
                self.reread(false).await;
                self.check(event, h, payload)
            }
            other => other,
        }
    }
}

async fn read_all(kv: &kv::Store) -> Result<Vec<SignerRecord>, async_nats::Error> {
    let mut listing = kv
        .stream
        .info_with_subjects(format!("{}>", kv.prefix))
        .await?;
    let mut keys = Vec::new();
    while let Some(entry) = listing.next().await {
        let (subject, _) = entry?;
        if let Some(key) = subject.strip_prefix(kv.prefix.as_str()) {
            keys.push(key.to_owned());
        }
    }
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(value) = kv.get(&key).await? {
            match serde_json::from_slice::<SignerRecord>(&value) {
                Ok(record) if record.public_key == key => records.push(record),
                _ => tracing::warn!(signer = %key, "Skipping a signer record that does not parse."),
            }
        }
    }
    Ok(records)
}

/// Applies each change of the bucket as it is published.
async fn follow(
    trust: std::sync::Weak<Trust>,
    mut changes: async_nats::Subscriber,
    prefix: String,
) {
    while let Some(message) = changes.next().await {
        let Some(trust) = trust.upgrade() else { return };
        let Some(key) = message.subject.as_str().strip_prefix(prefix.as_str()) else {
            continue;
        };
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() != "PUT");
        let Ok(mut signers) = trust.signers.write() else {
            return;
        };
        if deleted {
            signers.remove(key);
        } else if let Ok(record) = serde_json::from_slice::<SignerRecord>(&message.payload)
            && record.public_key == key
        {
            signers.insert(record);
        }
    }
}

//! The worker's decision signing key (`docs/contract.md`, "Signed
//! decisions"): each decision is signed once, and the same signature goes
//! into the receipt and onto the delivery or dead letter.
//!
//! The per-event work is [`Sealer::seal`] (one SHA-256 of the payload and
//! one Ed25519 signature) and [`Sealer::stamp`] (four headers); everything
//! else here runs at start.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream;
use schemas::DecisionReceipt;
use schemas::signing::{SignerRecord, SignerStatus, SigningKey};

/// Signs decisions with this replica's key.
#[derive(Debug, Clone)]
pub(crate) struct Sealer {
    key: Arc<SigningKey>,
}

impl Sealer {
    /// The configured key, or — without one — a fresh key for this run,
    /// which the worker then tries to add to `mesh-signers` itself. Only a
    /// broker without authorization lets it (a development stack); with
    /// authorization recipients refuse its deliveries until the operator
    /// adds the key (`meshctl signers add`).
    pub(crate) async fn start(key: Option<Arc<SigningKey>>, js: &jetstream::Context) -> Self {
        let key = match key {
            Some(key) => {
                tracing::info!(signer = key.public_key(), "Signing decisions.");
                key
            }
            None => {
                let key = Arc::new(SigningKey::generate());
                register_self(js, &key).await;
                key
            }
        };
        Self { key }
    }

    /// The public key.
    pub(crate) fn public_key(&self) -> &str {
        self.key.public_key()
    }

    /// Signs the final `receipt` of the event whose message payload is
    /// `payload` (sets `data_sha256`, `signer`, `signature`).
    pub(crate) fn seal(&self, receipt: &mut DecisionReceipt, payload: &[u8]) {
        self.key.seal(receipt, payload);
    }

    /// Signs a receipt whose `data_sha256` is already set (an approval's
    /// outcome, decided after the payload was stored).
    pub(crate) fn seal_digest(&self, receipt: &mut DecisionReceipt) {
        self.key.seal_digest(receipt);
    }

    /// Puts a sealed receipt's signature headers on a copy.
    pub(crate) fn stamp(receipt: &DecisionReceipt, h: &mut HeaderMap) {
        SigningKey::stamp(receipt, h);
    }
}

async fn register_self(js: &jetstream::Context, key: &SigningKey) {
    let record = SignerRecord {
        public_key: key.public_key().to_owned(),
        name: "policy-worker (unconfigured, this run only)".into(),
        status: SignerStatus::Active,
        added_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        retired_at: String::new(),
        revoked_at: String::new(),
    };
    let registered = async {
        let kv = js.get_key_value(schemas::subjects::BUCKET_SIGNERS).await?;
        // INVARIANT: a record of strings always serialises.
        let value = serde_json::to_vec(&record)?;
        kv.put(key.public_key(), value.into()).await?;
        Ok::<_, async_nats::Error>(())
    };
    match registered.await {
        Ok(()) => tracing::warn!(
            signer = key.public_key(),
            "No signing key configured: signing with a key for this run only, added to `mesh-signers` (the broker lets anyone write it: development only)."
        ),
        Err(error) => tracing::warn!(
            signer = key.public_key(),
            %error,
            "No signing key configured and `mesh-signers` not writable: recipients refuse this worker's deliveries until the operator adds the key (`meshctl signers add`)."
        ),
    }
}

impl Sealer {
    /// Signs a cached answer (`Mesh-Cache: hit`) over its own attributes
    /// and payload, with the call's decision id, policy hash, trace id and
    /// time from the sealed `receipt`, and stamps it.
    pub(crate) fn seal_answer(&self, receipt: &DecisionReceipt, h: &mut HeaderMap, payload: &[u8]) {
        use schemas::AttributesReader as _;
        let Ok((event, _)) = schemas::decode(Some(&*h), payload) else {
            return;
        };
        let agent = event
            .source()
            .to_string()
            .strip_prefix("/agents/")
            .unwrap_or_default()
            .to_owned();
        let target = event
            .extension(schemas::ext::TARGET)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let digest = schemas::signing::sha256_hex(payload);
        let fields = schemas::signing::SignedFields {
            decision_id: &receipt.decision_id,
            agent: &agent,
            event_id: event.id(),
            event_type: event.ty(),
            target: &target,
            subject: event.subject().unwrap_or(""),
            decision: schemas::Decision::Allow.as_str(),
            policy_hash: &receipt.policy_hash,
            trace_id: &receipt.trace_id,
            data_sha256: &digest,
            decided_at: &receipt.decided_at,
        };
        let signature = self.key.sign(&fields.bytes());
        h.insert(
            schemas::headers::DECISION,
            schemas::Decision::Allow.as_str(),
        );
        h.insert(schemas::headers::DECIDED_AT, receipt.decided_at.as_str());
        h.insert(schemas::headers::SIGNER, self.public_key());
        h.insert(schemas::headers::SIGNATURE, signature.as_str());
    }
}

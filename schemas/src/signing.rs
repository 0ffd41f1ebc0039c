//! Signed decisions and audit checkpoints (`docs/contract.md`, "Signed
//! decisions"): the exact bytes a policy worker signs for each decision,
//! the signer records of the `mesh-signers` bucket, verification of a
//! delivery or dead letter, and the checkpoints the audit sink stores on
//! `MESH_AUDIT`.
//!
//! The signed bytes are a sequence of netstrings (`<decimal byte length>:`
//! `<UTF-8 bytes>,`), one per field in a fixed order, the first the
//! version tag [`SIGNED_BYTES_VERSION`]. Netstrings need no escaping, so
//! any field value (an event id with a newline, an empty target) has one
//! encoding and no two field lists share bytes. The signature is Ed25519
//! (RFC 8032) by the signer's nkey; the public key is its nkey string.

use std::collections::HashMap;
use std::fmt;

use async_nats::{HeaderMap, HeaderName};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Decision, DecisionReceipt, MeshEvent, headers};

/// The first field of every signed byte string: what is signed, and its
/// layout's version.
pub const SIGNED_BYTES_VERSION: &str = "agentmesh.decision.v1";

/// The first field of a batch's signed bytes ([`batch_bytes`]).
pub const BATCH_BYTES_VERSION: &str = "agentmesh.batch.v1";

/// The exact bytes a batch signature covers: the netstrings of
/// [`BATCH_BYTES_VERSION`], the signer's public key, the number of leaves
/// (decimal) and the Merkle root (lowercase hex).
pub fn batch_bytes(signer: &str, size: u64, root: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    for field in [BATCH_BYTES_VERSION, signer, &size.to_string(), root] {
        netstring(&mut out, field);
    }
    out
}

/// A decision's leaf in a batch: SHA-256 of its signed bytes
/// ([`SignedFields::bytes`]); the tree hashes it once more as a leaf
/// ([`crate::merkle::leaf_hash`]).
pub fn leaf(signed_bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(signed_bytes).into()
}

/// The lowercase hex SHA-256 of `bytes` (the digest of a message payload
/// that the signature binds).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Appends `value` as a netstring: `<byte length>:<bytes>,`.
fn netstring(out: &mut Vec<u8>, value: &str) {
    let mut digits = [0; 20];
    let length = crate::receipt::decimal(value.len() as u64, &mut digits);
    out.extend_from_slice(length.as_bytes());
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
    out.push(b',');
}

/// The fields a decision signature binds, in signing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedFields<'a> {
    /// The decision's id (`decision_id`, `Mesh-Decision-Id`).
    pub decision_id: &'a str,
    /// The publishing agent (`agent`; the agent of the event's `source`).
    pub agent: &'a str,
    /// The event id (`event_id`, `ce-id`; empty when an invalid event had none).
    pub event_id: &'a str,
    /// The event type (`type`, `ce-type`).
    pub event_type: &'a str,
    /// The target agent, empty when none (`target`, `ce-target`).
    pub target: &'a str,
    /// The CloudEvents `subject` (a tool call's tool), empty when none.
    pub subject: &'a str,
    /// `allow`, `deny` or `invalid` (`decision`, `Mesh-Decision`).
    pub decision: &'a str,
    /// The deciding policy set's hash (`policy_hash`, `Mesh-Policy-Hash`).
    pub policy_hash: &'a str,
    /// The workflow's trace id (`trace_id`, `Mesh-Trace-Id`).
    pub trace_id: &'a str,
    /// Lowercase hex SHA-256 of the message payload (`data_sha256`).
    pub data_sha256: &'a str,
    /// When it was decided (`decided_at`, `Mesh-Decided-At`), as written.
    pub decided_at: &'a str,
}

impl<'a> SignedFields<'a> {
    /// The fields of a receipt.
    pub fn of_receipt(receipt: &'a DecisionReceipt) -> Self {
        Self {
            decision_id: &receipt.decision_id,
            agent: &receipt.agent,
            event_id: &receipt.event_id,
            event_type: &receipt.event_type,
            target: receipt.target.as_deref().unwrap_or(""),
            subject: receipt.subject.as_deref().unwrap_or(""),
            decision: receipt.decision.as_str(),
            policy_hash: &receipt.policy_hash,
            trace_id: &receipt.trace_id,
            data_sha256: &receipt.data_sha256,
            decided_at: &receipt.decided_at,
        }
    }

    /// The exact bytes signed: [`SIGNED_BYTES_VERSION`] and the eleven
    /// fields in declaration order, each a netstring.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        for field in [
            SIGNED_BYTES_VERSION,
            self.decision_id,
            self.agent,
            self.event_id,
            self.event_type,
            self.target,
            self.subject,
            self.decision,
            self.policy_hash,
            self.trace_id,
            self.data_sha256,
            self.decided_at,
        ] {
            netstring(&mut out, field);
        }
        out
    }
}

/// A signing key: an nkey seed (`S…`), Ed25519 underneath.
pub struct SigningKey {
    key: nkeys::KeyPair,
    public: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A seed that is not an nkey seed.
#[derive(Debug, thiserror::Error)]
#[error("not an nkey seed: {0}")]
pub struct InvalidSeed(String);

impl SigningKey {
    /// A new random key (an nkey of the server kind: public keys start
    /// with `N`).
    pub fn generate() -> Self {
        Self::from_pair(nkeys::KeyPair::new_server())
    }

    /// The key of `seed` (the first line of a `.nk` file).
    pub fn from_seed(seed: &str) -> Result<Self, InvalidSeed> {
        nkeys::KeyPair::from_seed(seed.trim())
            .map(Self::from_pair)
            .map_err(|e| InvalidSeed(e.to_string()))
    }

    fn from_pair(key: nkeys::KeyPair) -> Self {
        Self {
            public: key.public_key(),
            key,
        }
    }

    /// The seed, to store in a `.nk` file.
    pub fn seed(&self) -> String {
        self.key.seed().unwrap_or_default()
    }

    /// The public key: the signer's name in `mesh-signers` and `Mesh-Signer`.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The Ed25519 signature of `bytes`, standard base64 with padding;
    /// empty if the key cannot sign (see [`SigningKey::try_sign`]).
    pub fn sign(&self, bytes: &[u8]) -> String {
        self.try_sign(bytes).unwrap_or_default()
    }

    /// The Ed25519 signature of `bytes`, standard base64 with padding.
    pub fn try_sign(&self, bytes: &[u8]) -> Result<String, SignFailed> {
        let signature = self
            .key
            .sign(bytes)
            .map_err(|e| SignFailed(e.to_string()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature))
    }

    /// Signs the decisions whose signed bytes are `batch` at once: one
    /// alone gets its own signature ([`Seal::Single`]), two or more a
    /// Merkle tree whose root is signed ([`Seal::Batch`], one per
    /// decision, in order).
    pub fn seal_batch<T: AsRef<[u8]>>(&self, batch: &[T]) -> Result<Vec<Seal>, SignFailed> {
        match batch {
            [] => Ok(Vec::new()),
            [one] => Ok(vec![Seal::Single {
                signature: self.try_sign(one.as_ref())?,
            }]),
            many => {
                let leaves: Vec<[u8; 32]> = many.iter().map(|b| leaf(b.as_ref())).collect();
                // INVARIANT: `many` has two or more entries.
                let tree = crate::merkle::Tree::new(&leaves)
                    .ok_or_else(|| SignFailed("empty batch".into()))?;
                let root = hex(&tree.root);
                let signature =
                    self.try_sign(&batch_bytes(&self.public, leaves.len() as u64, &root))?;
                Ok(tree
                    .proofs
                    .iter()
                    .map(|proof| Seal::Batch {
                        root: root.clone(),
                        proof: proof.encode(),
                        signature: signature.clone(),
                    })
                    .collect())
            }
        }
    }

    /// Signs `receipt` for `payload` (the event's message payload): sets
    /// `data_sha256`, `signer` and `signature`. `decided_at` and every other
    /// signed field must be final.
    pub fn seal(&self, receipt: &mut DecisionReceipt, payload: &[u8]) {
        receipt.data_sha256 = sha256_hex(payload);
        self.seal_digest(receipt);
    }

    /// Signs `receipt` whose `data_sha256` is already set.
    pub fn seal_digest(&self, receipt: &mut DecisionReceipt) {
        receipt.signer = self.public.clone();
        receipt.signature = self.sign(&SignedFields::of_receipt(receipt).bytes());
    }

    /// Adds the signature headers of a sealed `receipt` to a copy the
    /// worker publishes (delivery or dead letter): `Mesh-Decision`,
    /// `Mesh-Decided-At`, `Mesh-Signer`, and `Mesh-Signature` or the
    /// three `Mesh-Batch-*`.
    pub fn stamp(receipt: &DecisionReceipt, h: &mut HeaderMap) {
        // This runs for every delivery: the names are neither parsed nor
        // allocated, and the seal's strings are not copied first (what
        // `Seal::of_receipt(receipt).stamp(h)` puts).
        const DECISION: HeaderName = HeaderName::from_static(headers::DECISION);
        const DECIDED_AT: HeaderName = HeaderName::from_static(headers::DECIDED_AT);
        const SIGNER: HeaderName = HeaderName::from_static(headers::SIGNER);
        const SIGNATURE: HeaderName = HeaderName::from_static(headers::SIGNATURE);
        const BATCH_ROOT: HeaderName = HeaderName::from_static(headers::BATCH_ROOT);
        const BATCH_PROOF: HeaderName = HeaderName::from_static(headers::BATCH_PROOF);
        const BATCH_SIGNATURE: HeaderName = HeaderName::from_static(headers::BATCH_SIGNATURE);
        h.insert(DECISION, receipt.decision.as_str());
        h.insert(DECIDED_AT, receipt.decided_at.as_str());
        h.insert(SIGNER, receipt.signer.as_str());
        if !receipt.signature.is_empty() {
            h.insert(SIGNATURE, receipt.signature.as_str());
        } else if !receipt.batch_signature.is_empty() {
            h.insert(BATCH_ROOT, receipt.batch_root.as_str());
            h.insert(BATCH_PROOF, receipt.batch_proof.as_str());
            h.insert(BATCH_SIGNATURE, receipt.batch_signature.as_str());
        } else {
            h.insert(SIGNATURE, "");
        }
    }
}

/// A key that cannot sign (a public key only): the decision must not be
/// published as signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot sign: {0}")]
pub struct SignFailed(pub String);

/// How one decision is signed: alone, or as a leaf of a signed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seal {
    /// Its own Ed25519 signature of its signed bytes (`Mesh-Signature`).
    Single {
        /// Standard base64.
        signature: String,
    },
    /// A leaf of a batch: the batch's root, the decision's inclusion
    /// proof, and the signature of the batch's signed bytes
    /// (`Mesh-Batch-Root`, `Mesh-Batch-Proof`, `Mesh-Batch-Signature`).
    Batch {
        /// The Merkle root, lowercase hex.
        root: String,
        /// [`crate::merkle::Proof::encode`].
        proof: String,
        /// Ed25519 of [`batch_bytes`], standard base64.
        signature: String,
    },
}

impl Seal {
    /// The seal a receipt carries: `signature`, or else the three
    /// `batch_*` fields; `None` when unsigned.
    pub fn of_receipt(receipt: &DecisionReceipt) -> Option<Self> {
        if !receipt.signature.is_empty() {
            Some(Self::Single {
                signature: receipt.signature.clone(),
            })
        } else if !receipt.batch_signature.is_empty() {
            Some(Self::Batch {
                root: receipt.batch_root.clone(),
                proof: receipt.batch_proof.clone(),
                signature: receipt.batch_signature.clone(),
            })
        } else {
            None
        }
    }

    /// The seal of a delivery's headers: `Mesh-Signature`, or else the
    /// three `Mesh-Batch-*`.
    pub fn of_headers(h: Option<&HeaderMap>) -> Result<Self, Refused> {
        let header = |name: &'static str| {
            h.and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .ok_or(Refused::Missing(name))
        };
        if let Ok(signature) = header(headers::SIGNATURE) {
            return Ok(Self::Single { signature });
        }
        match header(headers::BATCH_SIGNATURE) {
            Ok(signature) => Ok(Self::Batch {
                root: header(headers::BATCH_ROOT)?,
                proof: header(headers::BATCH_PROOF)?,
                signature,
            }),
            Err(_) => Err(Refused::Missing(headers::SIGNATURE)),
        }
    }

    /// Writes it into a receipt (`signature` or the `batch_*` fields).
    pub fn write(self, receipt: &mut DecisionReceipt) {
        match self {
            Self::Single { signature } => receipt.signature = signature,
            Self::Batch {
                root,
                proof,
                signature,
            } => {
                receipt.batch_root = root;
                receipt.batch_proof = proof;
                receipt.batch_signature = signature;
            }
        }
    }

    /// Puts it on a message: `Mesh-Signature`, or the three `Mesh-Batch-*`.
    pub fn stamp(&self, h: &mut HeaderMap) {
        match self {
            Self::Single { signature } => h.insert(headers::SIGNATURE, signature.as_str()),
            Self::Batch {
                root,
                proof,
                signature,
            } => {
                h.insert(headers::BATCH_ROOT, root.as_str());
                h.insert(headers::BATCH_PROOF, proof.as_str());
                h.insert(headers::BATCH_SIGNATURE, signature.as_str());
            }
        }
    }
}

/// Batch roots whose signature a recipient has verified: later decisions
/// of the same batch cost a SHA-256 per proof step, not an Ed25519
/// verification. Keyed by signer, root and signature; whether the signer
/// is trusted is checked on every decision regardless (a revocation
/// applies at once). Holds at most [`VerifiedRoots::CAPACITY`] roots and
/// starts over when full.
#[derive(Debug, Default)]
pub struct VerifiedRoots {
    roots: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl VerifiedRoots {
    /// The most roots remembered.
    pub const CAPACITY: usize = 4096;

    fn key(signer: &str, root: &str, signature: &str) -> String {
        format!("{signer} {root} {signature}")
    }

    fn contains(&self, key: &str) -> bool {
        self.roots.lock().is_ok_and(|r| r.contains(key))
    }

    fn insert(&self, key: String) {
        if let Ok(mut roots) = self.roots.lock() {
            if roots.len() >= Self::CAPACITY {
                roots.clear();
            }
            roots.insert(key);
        }
    }

    /// How many roots are remembered.
    pub fn len(&self) -> usize {
        self.roots.lock().map_or(0, |r| r.len())
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies an Ed25519 `signature` (standard base64) of `bytes` by the
/// nkey public key `signer`.
pub fn verify_signature(signer: &str, bytes: &[u8], signature: &str) -> Result<(), Refused> {
    let key = nkeys::KeyPair::from_public_key(signer)
        .map_err(|_| Refused::BadSigner(signer.to_owned()))?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| Refused::BadSignature)?;
    key.verify(bytes, &signature)
        .map_err(|_| Refused::BadSignature)
}

/// Where a signer stands in `mesh-signers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerStatus {
    /// Trusted now.
    Active,
    /// Rotated out: trusted for what it signed up to `retired_at`.
    Retired,
    /// Compromised or withdrawn: nothing it signed is trusted.
    Revoked,
}

impl SignerStatus {
    /// `active`, `retired` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Retired => "retired",
            Self::Revoked => "revoked",
        }
    }
}

impl fmt::Display for SignerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One signer's record in `mesh-signers` (key: its public key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignerRecord {
    /// The nkey public key (`N…`).
    pub public_key: String,
    /// Who holds it, e.g. `policy-worker` or `audit-sink`.
    #[serde(default)]
    pub name: String,
    /// `active`, `retired` or `revoked`.
    pub status: SignerStatus,
    /// When it was added (RFC 3339, UTC).
    #[serde(default)]
    pub added_at: String,
    /// When it was retired (RFC 3339, UTC), for `retired`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub retired_at: String,
    /// When it was revoked (RFC 3339, UTC), for `revoked`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revoked_at: String,
}

impl SignerRecord {
    /// Whether a signature made at `signed_at` (RFC 3339) is trusted.
    pub fn trusts(&self, signed_at: &str) -> Result<(), Refused> {
        match self.status {
            SignerStatus::Active => Ok(()),
            SignerStatus::Revoked => Err(Refused::Revoked(self.public_key.clone())),
            SignerStatus::Retired => {
                let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
                match (at(signed_at), at(&self.retired_at)) {
                    (Some(signed), Some(retired)) if signed <= retired => Ok(()),
                    _ => Err(Refused::Retired {
                        signer: self.public_key.clone(),
                        retired_at: self.retired_at.clone(),
                    }),
                }
            }
        }
    }
}

/// The trusted signers: the records of `mesh-signers`, by public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signers {
    records: HashMap<String, SignerRecord>,
}

impl Signers {
    /// The set of `records`.
    pub fn new(records: impl IntoIterator<Item = SignerRecord>) -> Self {
        Self {
            records: records
                .into_iter()
                .map(|r| (r.public_key.clone(), r))
                .collect(),
        }
    }

    /// Adds or replaces a record.
    pub fn insert(&mut self, record: SignerRecord) {
        self.records.insert(record.public_key.clone(), record);
    }

    /// Forgets a signer (its key was deleted from the bucket).
    pub fn remove(&mut self, public_key: &str) {
        self.records.remove(public_key);
    }

    /// The record of `public_key`.
    pub fn get(&self, public_key: &str) -> Option<&SignerRecord> {
        self.records.get(public_key)
    }

    /// Every record.
    pub fn records(&self) -> impl Iterator<Item = &SignerRecord> {
        self.records.values()
    }

    /// Verifies a signature over `fields` by `signer`: the signer is known
    /// and trusted at `fields.decided_at`, and the signature matches.
    pub fn verify(
        &self,
        fields: &SignedFields<'_>,
        signer: &str,
        signature: &str,
    ) -> Result<(), Refused> {
        let record = self
            .records
            .get(signer)
            .ok_or_else(|| Refused::UnknownSigner(signer.to_owned()))?;
        record.trusts(fields.decided_at)?;
        verify_signature(signer, &fields.bytes(), signature)
    }

    /// Verifies `seal` over `fields` by `signer`: the signer is known and
    /// trusted at `fields.decided_at`, and either its own signature
    /// matches or its inclusion proof leads from the decision's leaf to
    /// the batch root whose signature matches. A root in `cache` was
    /// verified before (its signature is not checked again); one verified
    /// now is added.
    pub fn verify_seal(
        &self,
        fields: &SignedFields<'_>,
        signer: &str,
        seal: &Seal,
        cache: Option<&VerifiedRoots>,
    ) -> Result<(), Refused> {
        match seal {
            Seal::Single { signature } => self.verify(fields, signer, signature),
            Seal::Batch {
                root,
                proof,
                signature,
            } => {
                let record = self
                    .records
                    .get(signer)
                    .ok_or_else(|| Refused::UnknownSigner(signer.to_owned()))?;
                record.trusts(fields.decided_at)?;
                let proof = crate::merkle::Proof::decode(proof).map_err(|_| Refused::BadProof)?;
                let leaf = leaf(&fields.bytes());
                if proof.root(&leaf).map(|r| hex(&r)).as_deref() != Some(root.as_str()) {
                    return Err(Refused::BadProof);
                }
                let key = VerifiedRoots::key(signer, root, signature);
                if cache.is_some_and(|c| c.contains(&key)) {
                    return Ok(());
                }
                verify_signature(signer, &batch_bytes(signer, proof.size, root), signature)?;
                if let Some(cache) = cache {
                    cache.insert(key);
                }
                Ok(())
            }
        }
    }

    /// Verifies a receipt: its signature, or its batch's, by a trusted
    /// signer.
    pub fn verify_receipt(&self, receipt: &DecisionReceipt) -> Result<(), Refused> {
        self.verify_receipt_cached(receipt, None)
    }

    /// [`Signers::verify_receipt`] with a cache of verified batch roots.
    pub fn verify_receipt_cached(
        &self,
        receipt: &DecisionReceipt,
        cache: Option<&VerifiedRoots>,
    ) -> Result<(), Refused> {
        let seal = Seal::of_receipt(receipt).ok_or(Refused::Missing("signature"))?;
        self.verify_seal(
            &SignedFields::of_receipt(receipt),
            &receipt.signer,
            &seal,
            cache,
        )
    }

    /// Verifies a delivery (an approved event routed to its target): the
    /// `Mesh-*` signature headers, the event's attributes and the digest
    /// of `payload`; `Mesh-Decision` must be `allow`.
    pub fn verify_delivery(
        &self,
        event: &MeshEvent,
        h: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<(), Refused> {
        self.verify_delivery_cached(event, h, payload, None)
    }

    /// [`Signers::verify_delivery`] with a cache of verified batch roots:
    /// a delivery signed per event (`Mesh-Signature`) or in a batch
    /// (`Mesh-Batch-*`).
    pub fn verify_delivery_cached(
        &self,
        event: &MeshEvent,
        h: Option<&HeaderMap>,
        payload: &[u8],
        cache: Option<&VerifiedRoots>,
    ) -> Result<(), Refused> {
        let header = |name: &'static str| {
            h.and_then(|h| h.get(name))
                .map(|v| v.as_str())
                .ok_or(Refused::Missing(name))
        };
        let decision = header(headers::DECISION)?;
        if decision != Decision::Allow.as_str() {
            return Err(Refused::NotAllowed(decision.to_owned()));
        }
        let digest = sha256_hex(payload);
        let target = event.target.as_ref().map(|t| t.as_str()).unwrap_or("");
        let fields = SignedFields {
            decision_id: header(headers::DECISION_ID)?,
            agent: event.agent.as_str(),
            event_id: event.id(),
            event_type: event.event_type.as_str(),
            target,
            subject: cloudevents::AttributesReader::subject(&event.event).unwrap_or(""),
            decision,
            policy_hash: header(headers::POLICY_HASH)?,
            trace_id: header(headers::TRACE_ID)?,
            data_sha256: &digest,
            decided_at: header(headers::DECIDED_AT)?,
        };
        let signer = header(headers::SIGNER)?;
        let seal = Seal::of_headers(h)?;
        self.verify_seal(&fields, signer, &seal, cache)
    }
}

/// Why a signed decision is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// A header or field the signature needs is missing.
    #[error("unsigned: `{0}` missing")]
    Missing(&'static str),
    /// A delivery whose decision is not `allow`.
    #[error("decision `{0}` is not `allow`")]
    NotAllowed(String),
    /// The signer is not in `mesh-signers`.
    #[error("signer `{0}` is not trusted")]
    UnknownSigner(String),
    /// The signer was revoked.
    #[error("signer `{0}` is revoked")]
    Revoked(String),
    /// The signer was retired before this was signed.
    #[error("signer `{signer}` was retired at {retired_at}, before this decision")]
    Retired {
        /// The signer.
        signer: String,
        /// When it was retired.
        retired_at: String,
    },
    /// `Mesh-Signer` is not an nkey public key.
    #[error("`{0}` is not an nkey public key")]
    BadSigner(String),
    /// The signature does not match the bytes: something signed was altered.
    #[error("signature does not match (data, headers or attributes altered)")]
    BadSignature,
    /// A batch's inclusion proof is malformed or does not lead from the
    /// decision's leaf to the signed root: the proof, or something the
    /// leaf binds, was altered.
    #[error(
        "inclusion proof does not lead to the signed batch root (data, headers, attributes or proof altered)"
    )]
    BadProof,
}

impl Refused {
    /// A short label for metrics: `unsigned`, `not_allowed`, `untrusted`,
    /// `revoked`, `retired`, `bad_signature`, `bad_proof`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing(_) => "unsigned",
            Self::NotAllowed(_) => "not_allowed",
            Self::UnknownSigner(_) | Self::BadSigner(_) => "untrusted",
            Self::Revoked(_) => "revoked",
            Self::Retired { .. } => "retired",
            Self::BadSignature => "bad_signature",
            Self::BadProof => "bad_proof",
        }
    }
}

/// One decision receipt in an audit checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    /// Its `MESH_DECISION` stream sequence.
    pub seq: u64,
    /// `<agent>/<event id>` (`Nats-Msg-Id`).
    pub key: String,
    /// The receipt's trace id.
    pub trace_id: String,
    /// The receipt's `decided_at`.
    pub decided_at: String,
    /// Lowercase hex SHA-256 of the receipt message's payload, byte for byte.
    pub leaf: String,
}

/// A signed audit checkpoint on `mesh.audit.checkpoint.<signer>`: the
/// receipts one sink replica read from `MESH_DECISION`, in stream order,
/// linked to the same signer's previous checkpoint. The message payload is
/// this JSON; `Mesh-Signer` and `Mesh-Signature` sign the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Layout version, `1`.
    pub version: u32,
    /// The signer's public key (also in the subject).
    pub signer: String,
    /// Lowercase hex SHA-256 of the payload of this signer's previous
    /// checkpoint; empty for its first.
    pub prev: String,
    /// When it was made (RFC 3339, UTC).
    pub created_at: String,
    /// The receipts, by stream sequence.
    pub entries: Vec<CheckpointEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> DecisionReceipt {
        DecisionReceipt {
            event_id: "e-1".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            decision: Decision::Allow,
            policy_hash: "abc".into(),
            decision_id: "d-1".into(),
            agent: "planner".into(),
            event_type: "io.agentmesh.task.handoff".into(),
            target: Some("coder".into()),
            decided_at: "2026-01-02T03:04:05.000006Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn stamping_a_receipt_puts_its_seal() {
        let single = DecisionReceipt {
            signer: "NSIGNER".into(),
            signature: "c2ln".into(),
            ..receipt()
        };
        let batch = DecisionReceipt {
            signer: "NSIGNER".into(),
            batch_root: "ab".repeat(32),
            batch_proof: "0:cd".into(),
            batch_signature: "YmF0Y2g=".into(),
            ..receipt()
        };
        for r in [receipt(), single, batch] {
            let mut stamped = HeaderMap::new();
            SigningKey::stamp(&r, &mut stamped);
            let mut expected = HeaderMap::new();
            expected.insert(headers::DECISION, r.decision.as_str());
            expected.insert(headers::DECIDED_AT, r.decided_at.as_str());
            expected.insert(headers::SIGNER, r.signer.as_str());
            match Seal::of_receipt(&r) {
                Some(seal) => seal.stamp(&mut expected),
                None => expected.insert(headers::SIGNATURE, ""),
            }
            let pairs = |h: &HeaderMap| {
                let mut pairs: Vec<(String, String)> = h
                    .iter()
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                    .collect();
                pairs.sort();
                pairs
            };
            assert_eq!(pairs(&stamped), pairs(&expected));
            assert!(pairs(&stamped).len() >= 4);
        }
    }

    #[test]
    fn signed_bytes_are_netstrings_in_order() {
        let mut r = receipt();
        r.data_sha256 = sha256_hex(b"{}");
        let bytes = SignedFields::of_receipt(&r).bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(
            text,
            "21:agentmesh.decision.v1,3:d-1,7:planner,3:e-1,25:io.agentmesh.task.handoff,\
             5:coder,0:,5:allow,3:abc,32:4bf92f3577b34da6a3ce929d0e0e4736,\
             64:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a,\
             27:2026-01-02T03:04:05.000006Z,"
        );
    }

    #[test]
    fn sealed_receipts_verify_and_edits_do_not() {
        let key = SigningKey::generate();
        assert!(key.public_key().starts_with('N'));
        let mut r = receipt();
        key.seal(&mut r, b"{\"task\":\"x\"}");
        let mut signers = Signers::default();
        assert_eq!(
            signers.verify_receipt(&r),
            Err(Refused::UnknownSigner(key.public_key().to_owned()))
        );
        signers.insert(SignerRecord {
            public_key: key.public_key().to_owned(),
            name: "w".into(),
            status: SignerStatus::Active,
            added_at: String::new(),
            retired_at: String::new(),
            revoked_at: String::new(),
        });
        assert_eq!(signers.verify_receipt(&r), Ok(()));
        let mut edited = r.clone();
        edited.decision = Decision::Deny;
        assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadSignature));
        let mut edited = r.clone();
        edited.data_sha256 = sha256_hex(b"{}");
        assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadSignature));

        // Retired after the decision: still trusted; before: not.
        let mut record = signers.get(key.public_key()).unwrap().clone();
        record.status = SignerStatus::Retired;
        record.retired_at = "2026-01-02T03:04:06Z".into();
        signers.insert(record.clone());
        assert_eq!(signers.verify_receipt(&r), Ok(()));
        record.retired_at = "2026-01-02T03:04:05Z".into();
        signers.insert(record.clone());
        assert!(matches!(
            signers.verify_receipt(&r),
            Err(Refused::Retired { .. })
        ));
        record.status = SignerStatus::Revoked;
        signers.insert(record);
        assert!(matches!(
            signers.verify_receipt(&r),
            Err(Refused::Revoked(_))
        ));
    }

    fn trusting(key: &SigningKey) -> Signers {
        Signers::new([SignerRecord {
            public_key: key.public_key().to_owned(),
            name: "w".into(),
            status: SignerStatus::Active,
            added_at: String::new(),
            retired_at: String::new(),
            revoked_at: String::new(),
        }])
    }

    #[test]
    fn batch_bytes_are_netstrings_in_order() {
        assert_eq!(
            String::from_utf8(batch_bytes("NABC", 3, "00ff")).unwrap(),
            "18:agentmesh.batch.v1,4:NABC,1:3,4:00ff,"
        );
    }

    #[test]
    fn a_batch_of_one_is_signed_alone_and_more_share_a_root() {
        let key = SigningKey::generate();
        let signers = trusting(&key);
        let one = key.seal_batch(&[b"x".to_vec()]).unwrap();
        assert!(matches!(&one[..], [Seal::Single { .. }]));

        let receipts: Vec<DecisionReceipt> = (0..5)
            .map(|i| {
                let mut r = receipt();
                r.event_id = format!("e-{i}");
                r.data_sha256 = sha256_hex(b"{}");
                r.signer = key.public_key().to_owned();
                r
            })
            .collect();
        let bytes: Vec<Vec<u8>> = receipts
            .iter()
            .map(|r| SignedFields::of_receipt(r).bytes())
            .collect();
        let seals = key.seal_batch(&bytes).unwrap();
        assert_eq!(seals.len(), 5);
        let cache = VerifiedRoots::default();
        let mut sealed = Vec::new();
        for (mut r, seal) in receipts.into_iter().zip(seals) {
            let Seal::Batch { .. } = &seal else {
                panic!("{seal:?}")
            };
            seal.write(&mut r);
            assert!(r.signature.is_empty());
            assert_eq!(signers.verify_receipt(&r), Ok(()));
            assert_eq!(signers.verify_receipt_cached(&r, Some(&cache)), Ok(()));
            sealed.push(r);
        }
        assert_eq!(cache.len(), 1, "one root verified for the batch");

        // An altered decision, proof, root or signature is refused, with
        // and without the cache.
        let mut edited = sealed[2].clone();
        edited.decision = Decision::Deny;
        assert_eq!(
            signers.verify_receipt_cached(&edited, Some(&cache)),
            Err(Refused::BadProof)
        );
        let mut edited = sealed[2].clone();
        edited.batch_proof = sealed[3].batch_proof.clone();
        assert_eq!(
            signers.verify_receipt_cached(&edited, Some(&cache)),
            Err(Refused::BadProof)
        );
        // Another size for the same path: the signature binds the size.
        let mut edited = sealed[2].clone();
        let mut proof = crate::merkle::Proof::decode(&edited.batch_proof).unwrap();
        proof.size = 6;
        edited.batch_proof = proof.encode();
        assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadSignature));
        let mut edited = sealed[2].clone();
        edited.batch_proof = "garbage".into();
        assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadProof));
        let mut edited = sealed[2].clone();
        edited.batch_root = sha256_hex(b"another root");
        assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadProof));
        let mut edited = sealed[2].clone();
        edited.batch_signature = sealed[2].batch_signature.replace('A', "B");
        if edited.batch_signature != sealed[2].batch_signature {
            assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadSignature));
        }
        // Another key's signature over the same root: refused.
        let other = SigningKey::generate();
        let mut edited = sealed[2].clone();
        edited.batch_signature =
            other.sign(&batch_bytes(key.public_key(), 5, &sealed[2].batch_root));
        assert_eq!(signers.verify_receipt(&edited), Err(Refused::BadSignature));
        // A revoked signer's cached root is refused all the same.
        let mut record = signers.get(key.public_key()).unwrap().clone();
        record.status = SignerStatus::Revoked;
        let mut revoked = signers.clone();
        revoked.insert(record);
        assert!(matches!(
            revoked.verify_receipt_cached(&sealed[0], Some(&cache)),
            Err(Refused::Revoked(_))
        ));
    }

    #[test]
    fn a_seed_round_trips() {
        let key = SigningKey::generate();
        let again = SigningKey::from_seed(&key.seed()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert!(SigningKey::from_seed("nope").is_err());
    }
}

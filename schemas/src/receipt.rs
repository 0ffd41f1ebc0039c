//! Decisions and the decision receipt published on `mesh.decision.<source>`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The outcome for one ingress event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Policy permits it; routed when it has a `target`.
    Allow,
    /// Policy forbids it, or evaluation failed (fail closed).
    Deny,
    /// Not a well-formed mesh event.
    #[default]
    Invalid,
}

impl Decision {
    /// `allow`, `deny` or `invalid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Invalid => "invalid",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The receipt for one ingress event (JSON, contract fields first).
///
/// Fields after `ingress_subject` are optional extensions (guardrails): they
/// are left out of the JSON when empty, and a receipt without them parses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionReceipt {
    /// The id of the decided event (empty when the event had none).
    pub event_id: String,
    /// The workflow's trace id, 32 hex characters.
    pub trace_id: String,
    /// `allow`, `deny` or `invalid`.
    pub decision: Decision,
    /// Ids of the policies that determined the decision.
    pub reasons: Vec<String>,
    /// Evaluation or validation errors.
    pub errors: Vec<String>,
    /// Hash of the policy set that decided.
    pub policy_hash: String,
    /// Unique id of this decision.
    #[serde(default)]
    pub decision_id: String,
    /// The publishing agent (the ingress subject's agent token).
    #[serde(default)]
    pub agent: String,
    /// The event's `type`.
    #[serde(default, rename = "type")]
    pub event_type: String,
    /// The event's `target`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The event's `subject` (the tool of a tool call), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The event's `causationid`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The agent of the event's `causationsource`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_agent: Option<String>,
    /// Whether the trace id was derived because the event had no `traceparent`.
    #[serde(default)]
    pub trace_derived: bool,
    /// When the decision was made (RFC 3339, UTC, microseconds).
    #[serde(default)]
    pub decided_at: String,
    /// Time spent deciding, in microseconds.
    #[serde(default)]
    pub eval_micros: u64,
    /// The ingress subject the event arrived on.
    #[serde(default)]
    pub ingress_subject: String,
    /// What the payload detectors found in the event's data (e.g.
    /// `pii.email`, `secret.aws_access_key`); empty when nothing was found
    /// or no policy reads `context.detectors`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// The shadow policy set's decision, when the worker runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<Decision>,
    /// Ids of the shadow set's determining policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow_reasons: Vec<String>,
    /// The shadow set's evaluation errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow_errors: Vec<String>,
    /// Hash of the shadow policy set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_policy_hash: Option<String>,
    /// The human approval this decision waited for, when a permit required one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// What the tool-result cache did for this event (`docs/cache.md`):
    /// only on allowed calls of a tool declared cacheable, and on the
    /// result that filled an entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,
    /// On a `hit` (and a `stored` result): the call that first produced the
    /// cached result, as `<agent>/<event id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_source: Option<String>,
    /// The workflow labels the decision saw (`context.workflow.labels`,
    /// `docs/guardrails.md`); empty when the workflow held none or no labels
    /// are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The labels this event added to its workflow (it was allowed and
    /// `flows.toml` labels its tool or type), not already held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels_added: Vec<String>,
    /// Whether the workflow's label record was lost (purged or deleted):
    /// `labels` is then every declared label (fail closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labels_lost: bool,
    /// On an allow by an `@redact` permit: the detector kinds replaced in
    /// the delivered copy (e.g. `pii.email`); `data_sha256` is then the
    /// digest of the redacted payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<String>,
    /// Lowercase hex SHA-256 of the event's message payload, as the
    /// signature binds it (`docs/contract.md`, "Signed decisions"); of the
    /// delivered copy when it was redacted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_sha256: String,
    /// The signing policy worker's public key (nkey, `N…`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signer: String,
    /// Ed25519 signature (standard base64) of the signed bytes
    /// ([`crate::signing::SignedFields::bytes`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
    /// On a decision signed in a batch (instead of `signature`): the
    /// batch's Merkle root, lowercase hex ([`crate::signing::Seal`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub batch_root: String,
    /// On a decision signed in a batch: its inclusion proof
    /// ([`crate::merkle::Proof::encode`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub batch_proof: String,
    /// On a decision signed in a batch: the Ed25519 signature (standard
    /// base64) of the batch's signed bytes
    /// ([`crate::signing::batch_bytes`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub batch_signature: String,
}

/// What the tool-result cache did for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    /// The call was answered from the cache; the tool's agent never saw it.
    Hit,
    /// No fresh entry: the call was delivered to the tool's agent, and its
    /// result fills the cache.
    Miss,
    /// The tool is cacheable but this call was delivered without the cache
    /// (arguments not JSON, or the cache could not be read).
    Bypass,
    /// A `tool.result` whose data was stored as a cache entry.
    Stored,
}

impl CacheStatus {
    /// `hit`, `miss`, `bypass` or `stored`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
            Self::Stored => "stored",
        }
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where an approval request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStatus {
    /// Waiting for an approver (never in a receipt: receipts are final).
    Pending,
    /// An approver released the event: the decision is `allow`.
    Approved,
    /// An approver rejected the event: the decision is `deny`.
    Rejected,
    /// Nobody answered in time: the decision is `deny`.
    Expired,
}

impl ApprovalStatus {
    /// `pending`, `approved`, `rejected` or `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for ApprovalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The human approval recorded in a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The approval id (`meshctl approvals` lists it).
    pub id: String,
    /// `approved`, `rejected` or `expired`.
    pub status: ApprovalStatus,
    /// Who answered (empty when it expired).
    #[serde(default)]
    pub approver: String,
    /// The approver's comment, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// When the event was parked (RFC 3339, UTC).
    #[serde(default)]
    pub requested_at: String,
    /// When it was answered or expired (RFC 3339, UTC).
    #[serde(default)]
    pub answered_at: String,
}

/// Headers the mesh adds to delivered and dead-lettered events. Every
/// header whose name starts with [`headers::PREFIX`] (any case) belongs to
/// the mesh: the policy worker drops what an agent sends under it.
pub mod headers {
    /// The prefix of every mesh header, compared without case.
    pub const PREFIX: &str = "Mesh-";

    /// Whether `name` is a mesh header (`Mesh-*`, any case).
    pub fn is_mesh(name: &str) -> bool {
        name.get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
    }

    /// The decision id, on deliveries and dead letters.
    pub const DECISION_ID: &str = "Mesh-Decision-Id";
    /// The hash of the policy set that decided.
    pub const POLICY_HASH: &str = "Mesh-Policy-Hash";
    /// The workflow's trace id (useful when the event had no `traceparent`).
    pub const TRACE_ID: &str = "Mesh-Trace-Id";
    /// `allow` on deliveries, `deny` or `invalid` on dead letters.
    pub const DECISION: &str = "Mesh-Decision";
    /// Why, on dead letters (percent-encoded like `ce-*` values).
    pub const REASON: &str = "Mesh-Reason";
    /// Comma-separated ids of the determining policies, on dead letters.
    pub const POLICIES: &str = "Mesh-Policies";
    /// The ingress subject, on dead letters and approval requests.
    pub const INGRESS_SUBJECT: &str = "Mesh-Ingress-Subject";
    /// The approval id, on approval requests and on what they released.
    pub const APPROVAL_ID: &str = "Mesh-Approval-Id";
    /// Who approved, on deliveries of approved events.
    pub const APPROVER: &str = "Mesh-Approver";
    /// When an approval request expires (RFC 3339), on approval requests.
    pub const APPROVAL_EXPIRES: &str = "Mesh-Approval-Expires";
    /// `hit`, on a `tool.result` the worker answered from the tool-result
    /// cache (the tool's agent never saw the call).
    pub const CACHE: &str = "Mesh-Cache";
    /// On a cached answer: the call that first produced the result,
    /// `<agent>/<event id>`.
    pub const CACHE_SOURCE: &str = "Mesh-Cache-Source";
    /// On the delivery of a `tool.call`: the `mesh.call.<target>.<source>`
    /// subject where the same call was also stored, so an agent that reads
    /// its calls there skips this copy (older agents answer this one).
    pub const CALL: &str = "Mesh-Call";
    /// On a redacted delivery: the detector kinds replaced in it,
    /// comma-separated (e.g. `pii.email,secret.jwt`).
    pub const REDACTED: &str = "Mesh-Redacted";
    /// When the decision was made (the receipt's `decided_at`), on
    /// deliveries and dead letters: a signed field.
    pub const DECIDED_AT: &str = "Mesh-Decided-At";
    /// The signing policy worker's public key (nkey), on deliveries, dead
    /// letters and audit checkpoints.
    pub const SIGNER: &str = "Mesh-Signer";
    /// The Ed25519 signature (standard base64) of the decision's signed
    /// bytes, on deliveries and dead letters; of the payload, on audit
    /// checkpoints.
    pub const SIGNATURE: &str = "Mesh-Signature";
    /// On a decision signed in a batch (instead of `Mesh-Signature`): the
    /// batch's Merkle root, lowercase hex.
    pub const BATCH_ROOT: &str = "Mesh-Batch-Root";
    /// On a decision signed in a batch: its inclusion proof,
    /// `<index>.<size>.<path>` (`docs/security.md`).
    pub const BATCH_PROOF: &str = "Mesh-Batch-Proof";
    /// On a decision signed in a batch: the Ed25519 signature (standard
    /// base64) of the batch's signed bytes.
    pub const BATCH_SIGNATURE: &str = "Mesh-Batch-Signature";
}

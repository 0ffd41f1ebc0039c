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

impl DecisionReceipt {
    /// Appends the receipt's JSON to `out`: byte for byte what
    /// `serde_json::to_writer` writes (the same fields, order, omissions
    /// and escaping), without going through serde for the plain strings —
    /// the worker writes one per event, and most of a receipt is hex,
    /// base64 and ids that need no escaping.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let mut w = JsonObject::new(out);
        w.str("event_id", &self.event_id);
        w.str("trace_id", &self.trace_id);
        w.str("decision", self.decision.as_str());
        w.strs("reasons", &self.reasons);
        w.strs("errors", &self.errors);
        w.str("policy_hash", &self.policy_hash);
        w.str("decision_id", &self.decision_id);
        w.str("agent", &self.agent);
        w.str("type", &self.event_type);
        w.some_str("target", self.target.as_deref());
        w.some_str("subject", self.subject.as_deref());
        w.some_str("causation_id", self.causation_id.as_deref());
        w.some_str("causation_agent", self.causation_agent.as_deref());
        w.raw(
            "trace_derived",
            if self.trace_derived { "true" } else { "false" },
        );
        w.str("decided_at", &self.decided_at);
        w.raw("eval_micros", decimal(self.eval_micros, &mut [0; 20]));
        w.str("ingress_subject", &self.ingress_subject);
        self.write_extensions(&mut w)?;
        w.end();
        Ok(())
    }

    /// The optional fields, each left out when empty.
    fn write_extensions(&self, w: &mut JsonObject<'_>) -> Result<(), serde_json::Error> {
        w.some_strs("findings", &self.findings);
        w.some_str(
            "shadow_decision",
            self.shadow_decision.map(Decision::as_str),
        );
        w.some_strs("shadow_reasons", &self.shadow_reasons);
        w.some_strs("shadow_errors", &self.shadow_errors);
        w.some_str("shadow_policy_hash", self.shadow_policy_hash.as_deref());
        if let Some(approval) = &self.approval {
            w.key("approval");
            serde_json::to_writer(&mut *w.out, approval)?;
        }
        w.some_str("cache", self.cache.map(CacheStatus::as_str));
        w.some_str("cache_source", self.cache_source.as_deref());
        w.some_strs("labels", &self.labels);
        w.some_strs("labels_added", &self.labels_added);
        if self.labels_lost {
            w.raw("labels_lost", "true");
        }
        w.some_strs("redacted", &self.redacted);
        for (key, value) in [
            ("data_sha256", &self.data_sha256),
            ("signer", &self.signer),
            ("signature", &self.signature),
            ("batch_root", &self.batch_root),
            ("batch_proof", &self.batch_proof),
            ("batch_signature", &self.batch_signature),
        ] {
            if !value.is_empty() {
                w.str(key, value);
            }
        }
        Ok(())
    }
}

/// `n` in decimal, written into `buf` (no allocation: the receipt's
/// `eval_micros`, the signed bytes' netstring lengths).
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // INVARIANT: only ASCII digits were written.
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

/// A JSON object written field by field, as compact serde_json writes it.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// `"key":` (the keys are plain ASCII identifiers).
    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn raw(&mut self, key: &str, value: &str) {
        self.key(key);
        self.out.extend_from_slice(value.as_bytes());
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        json_string(self.out, value);
    }

    fn some_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    fn strs(&mut self, key: &str, values: &[String]) {
        self.key(key);
        self.out.push(b'[');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            json_string(self.out, value);
        }
        self.out.push(b']');
    }

    fn some_strs(&mut self, key: &str, values: &[String]) {
        if !values.is_empty() {
            self.strs(key, values);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// `value` as a JSON string: copied as is when no byte needs escaping
/// (serde_json escapes control characters, `"` and `\` only), else
/// serde_json's own escaping.
fn json_string(out: &mut Vec<u8>, value: &str) {
    // No early exit, so the check runs over whole vectors of bytes.
    let escape = value
        .bytes()
        .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if escape {
        // INVARIANT: writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    } else {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field set (no `..Default::default()`: a new field must be
    /// added here, and so to `write_json`, or this does not compile).
    fn full(text: &str) -> DecisionReceipt {
        let s = |x: &str| format!("{x}{text}");
        DecisionReceipt {
            event_id: s("e-1"),
            trace_id: s("4bf92f3577b34da6a3ce929d0e0e4736"),
            decision: Decision::Deny,
            reasons: vec![s("p-1"), s("p-2")],
            errors: vec![s("counters down")],
            policy_hash: s("ph"),
            decision_id: s("d-1"),
            agent: s("planner"),
            event_type: s("io.agentmesh.tool.call"),
            target: Some(s("coder")),
            subject: Some(s("git.diff")),
            causation_id: Some(s("c-1")),
            causation_agent: Some(s("reviewer")),
            trace_derived: true,
            decided_at: s("2026-12-07T16:00:00.000000Z"),
            eval_micros: 18_446_744_073_709_551_615,
            ingress_subject: s("mesh.ingress.planner.plan"),
            findings: vec![s("pii.email")],
            shadow_decision: Some(Decision::Allow),
            shadow_reasons: vec![s("s-1")],
            shadow_errors: vec![s("s-e")],
            shadow_policy_hash: Some(s("sph")),
            approval: Some(Approval {
                id: s("a-1"),
                status: ApprovalStatus::Approved,
                approver: s("alice"),
                comment: s("ok"),
                requested_at: s("t1"),
                answered_at: s("t2"),
            }),
            cache: Some(CacheStatus::Stored),
            cache_source: Some(s("coder/e-0")),
            labels: vec![s("secret")],
            labels_added: vec![s("pii")],
            labels_lost: true,
            redacted: vec![s("pii.email"), s("secret")],
            data_sha256: s("ab"),
            signer: s("N"),
            signature: s("sig"),
            batch_root: s("root"),
            batch_proof: s("proof"),
            batch_signature: s("bsig"),
        }
    }

    fn both(r: &DecisionReceipt) -> (String, String) {
        let mut ours = Vec::new();
        r.write_json(&mut ours).unwrap();
        let serde = serde_json::to_string(r).unwrap();
        (String::from_utf8(ours).unwrap(), serde)
    }

    #[test]
    fn write_json_is_serde_json_byte_for_byte() {
        let tricky = [
            "",
            " plain",
            "\"quoted\" \\ back",
            "\n\t\r\u{0}\u{1f} controls",
            "\u{7f} del / slash",
            "héllo wörld ✓ 𝄞",
        ];
        for text in tricky {
            let (ours, serde) = both(&full(text));
            assert_eq!(ours, serde, "{text:?}");
        }
        let mut sparse = DecisionReceipt::default();
        for _ in 0..2 {
            let (ours, serde) = both(&sparse);
            assert_eq!(ours, serde, "{sparse:?}");
            sparse.eval_micros = 7;
            sparse.decision = Decision::Allow;
            sparse.target = Some("coder".into());
            sparse.approval = Some(Approval {
                id: "a".into(),
                status: ApprovalStatus::Expired,
                approver: String::new(),
                comment: String::new(),
                requested_at: String::new(),
                answered_at: String::new(),
            });
        }
        for n in [0, 9, 10, 99, 100, 1_234_567] {
            let r = DecisionReceipt {
                eval_micros: n,
                ..Default::default()
            };
            let (ours, serde) = both(&r);
            assert_eq!(ours, serde, "{n}");
        }
    }
}

//! Rows of the audit tables, built from NATS messages.
//!
//! Building a row never fails: whatever arrives gets one. What could not be
//! understood is recorded (`valid = 0`, `error` says why) next to whatever
//! could be recovered, so a bad message is stored, never dropped, and never
//! holds up the batch it came in. Payloads are kept whole: as text when they
//! are UTF-8, else as lowercase hex (`data_encoding` says which; `unhex(data)`
//! gives the bytes back on every ClickHouse version).

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use schemas::{
    AgentId, ContentMode, Data, DecisionReceipt, Event, Limits, MeshEvent, RawAttributes, subjects,
};
use serde::{Deserialize, Serialize};

/// Where a message sat in its stream and when the broker received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The stream it was read from.
    pub stream: String,
    /// Its stream sequence number.
    pub stream_seq: u64,
    /// When the broker stored it, in microseconds since the Unix epoch.
    pub received_us: i64,
}

impl Meta {
    /// The identity of a message that has no id of its own: `<stream>/<seq>`.
    fn msg_key(&self) -> String {
        format!("{}/{}", self.stream, self.stream_seq)
    }
}

/// `utf8` for text payloads, `hex` for the rest.
pub const ENCODING_UTF8: &str = "utf8";
/// Payloads that are not UTF-8, stored as lowercase hex.
pub const ENCODING_HEX: &str = "hex";
/// No data: the original of a redacted delivery, which the policy worker
/// erased and the audit sink never wrote (`--redacted-original drop`).
pub const ENCODING_DROPPED: &str = "dropped";

/// A payload as a `String` column: UTF-8 text as is, anything else as hex.
pub fn encode_bytes(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), ENCODING_UTF8),
        Err(_) => (hex::encode(bytes), ENCODING_HEX),
    }
}

/// The bytes a `String` column of [`encode_bytes`] holds (`encoding` is
/// its `*_encoding` column); bad hex gives none.
pub fn decode_bytes(text: &str, encoding: &str) -> Vec<u8> {
    if encoding == ENCODING_HEX {
        hex::decode(text).unwrap_or_default()
    } else {
        text.as_bytes().to_vec()
    }
}

/// The receipt a decision row stores, as received.
pub fn receipt_bytes(row: &DecisionRow) -> Vec<u8> {
    decode_bytes(&row.receipt, &row.receipt_encoding)
}

/// [`encode_bytes`] for a payload already owned: UTF-8 text is kept without
/// a copy.
fn encode_vec(bytes: Vec<u8>) -> (String, &'static str) {
    match String::from_utf8(bytes) {
        Ok(text) => (text, ENCODING_UTF8),
        Err(e) => (hex::encode(e.as_bytes()), ENCODING_HEX),
    }
}

/// `DateTime` columns hold seconds since the epoch as `UInt32`.
fn datetime_secs(micros: i64) -> u32 {
    (micros.div_euclid(1_000_000)).clamp(0, i64::from(u32::MAX)) as u32
}

fn micros_u64(micros: i64) -> u64 {
    micros.max(0) as u64
}

fn parse_rfc3339_us(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_micros())
}

impl EventRow {
    /// The row without its data (`data_encoding` [`ENCODING_DROPPED`]).
    pub fn drop_data(&mut self) {
        self.data = String::new();
        self.data_encoding = ENCODING_DROPPED.to_owned();
    }
}

/// One row of `events`: one ingress event. (`Deserialize` too: `meshctl
/// policy replay` reads rows back and [`rebuild_event`]s them.)
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct EventRow {
    /// The CloudEvents `id` ('' when absent).
    pub event_id: String,
    /// The workflow: from `traceparent`, else derived from the id.
    pub trace_id: String,
    /// `causationid`, '' for a root step.
    pub parent_id: String,
    /// The agent of `causationsource` (the parent's agent), '' when the
    /// event did not say.
    pub parent_agent: String,
    /// The subject's agent token.
    pub agent: String,
    /// The CloudEvents `type`.
    pub r#type: String,
    /// `target`, '' when absent.
    pub target: String,
    /// The CloudEvents `subject` (the tool of a tool call).
    pub subject: String,
    /// The event's `time`, else when the broker received it (seconds).
    pub time: u32,
    /// The same instant in microseconds.
    pub time_us: u64,
    /// The CloudEvents `source`.
    pub source: String,
    /// The `traceparent` as sent ('' when absent).
    pub traceparent: String,
    /// 1 when `trace_id` was derived from the id.
    pub trace_derived: u8,
    /// `binary`, `structured`, or '' when not a CloudEvent.
    pub content_mode: String,
    /// The `datacontenttype`.
    pub datacontenttype: String,
    /// The `dataschema`.
    pub dataschema: String,
    /// The data, whole (see `data_encoding`).
    pub data: String,
    /// `utf8` or `hex`.
    pub data_encoding: String,
    /// 1 when the event passed the mesh's validation.
    pub valid: u8,
    /// Why it did not, '' when valid.
    pub error: String,
    /// The subject it arrived on.
    pub ingress_subject: String,
    /// Its `MESH_INGRESS` sequence number.
    pub stream_seq: u64,
    /// When the broker received it (seconds).
    pub received_at: u32,
    /// When the broker received it (microseconds).
    pub received_us: u64,
    /// '' for events with an id; `<stream>/<seq>` for those without.
    pub msg_key: String,
}

/// Why a row's event could not be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// `data_encoding` is `hex` but `data` is not hex.
    #[error("event `{id}` has bad hex data: {why}")]
    BadHex {
        /// The event id.
        id: String,
        /// What the hex decoder said.
        why: String,
    },
    /// Its data was dropped (`data_encoding` `dropped`): the original of a
    /// redacted delivery is kept nowhere, so the event cannot be decided again.
    #[error(
        "event `{id}` has no data to replay: it was delivered redacted and its original dropped (--redacted-original drop)"
    )]
    Dropped {
        /// The event id.
        id: String,
    },
    /// The attributes do not make a CloudEvent.
    #[error("event `{id}` cannot be rebuilt: {why}")]
    Invalid {
        /// The event id.
        id: String,
        /// What the CloudEvents builder said.
        why: String,
    },
}

/// The event of a row, encoded as it arrived in binary mode: the reverse of
/// [`event_row`] for a valid event (what a policy reads; `time` and
/// `dataschema` are left out: no policy context reads them).
pub fn rebuild_event(row: &EventRow) -> Result<(HeaderMap, bytes::Bytes), RebuildError> {
    use schemas::{EventBuilder as _, EventBuilderV10, ext};
    let mut builder = EventBuilderV10::new()
        .id(row.event_id.clone())
        .source(row.source.clone())
        .ty(row.r#type.clone());
    let causation_source = if row.parent_agent.is_empty() {
        String::new()
    } else {
        format!("/agents/{}", row.parent_agent)
    };
    for (name, value) in [
        (ext::TRACEPARENT, &row.traceparent),
        (ext::CAUSATIONID, &row.parent_id),
        (ext::CAUSATIONSOURCE, &causation_source),
        (ext::TARGET, &row.target),
    ] {
        if !value.is_empty() {
            builder = builder.extension(name, value.clone());
        }
    }
    if !row.subject.is_empty() {
        builder = builder.subject(row.subject.clone());
    }
    if row.data_encoding == ENCODING_DROPPED {
        return Err(RebuildError::Dropped {
            id: row.event_id.clone(),
        });
    }
    let data = if row.data_encoding == ENCODING_HEX {
        hex::decode(&row.data).map_err(|e| RebuildError::BadHex {
            id: row.event_id.clone(),
            why: e.to_string(),
        })?
    } else {
        row.data.clone().into_bytes()
    };
    if !row.datacontenttype.is_empty() {
        builder = builder.data(row.datacontenttype.clone(), data.clone());
    }
    let mut event = builder.build().map_err(|e| RebuildError::Invalid {
        id: row.event_id.clone(),
        why: e.to_string(),
    })?;
    if row.datacontenttype.is_empty() && !data.is_empty() {
        event.set_data_unchecked(data);
    }
    Ok(schemas::encode_binary(&event))
}

fn event_data(event: &Event) -> Vec<u8> {
    match event.data() {
        None => Vec::new(),
        Some(Data::Binary(b)) => b.clone(),
        Some(Data::String(s)) => s.as_bytes().to_vec(),
        Some(Data::Json(v)) => serde_json::to_vec(v).unwrap_or_default(),
    }
}

/// The agent of a `/agents/<agent>` source, '' for any other.
fn source_agent(source: &str) -> String {
    AgentId::from_source(source)
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// The row for one message of `MESH_INGRESS`.
pub fn event_row(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    meta: &Meta,
) -> EventRow {
    let agent = subjects::parse_ingress(subject)
        .map(|p| p.agent.to_owned())
        .unwrap_or_default();
    let received_us = meta.received_us;
    // The trace of an event the policy worker could not use: as it records it.
    let fallback_trace = |attrs: &RawAttributes| {
        let (trace, derived) = attrs.trace(subject);
        (trace.trace_id_hex(), u8::from(derived))
    };
    let base = |attrs: RawAttributes,
                (trace_id, trace_derived): (String, u8),
                parent_agent: String,
                (data, data_encoding): (String, &'static str),
                mode: Option<ContentMode>,
                error: String| {
        let time_us = parse_rfc3339_us(&attrs.time).unwrap_or(received_us);
        let msg_key = if attrs.id.is_empty() {
            meta.msg_key()
        } else {
            String::new()
        };
        EventRow {
            event_id: attrs.id,
            trace_id,
            parent_id: attrs.causationid,
            parent_agent,
            agent: agent.clone(),
            r#type: attrs.ty,
            target: attrs.target,
            subject: attrs.subject,
            time: datetime_secs(time_us),
            time_us: micros_u64(time_us),
            source: attrs.source,
            traceparent: attrs.traceparent,
            trace_derived,
            content_mode: mode.map(|m| m.as_str().to_owned()).unwrap_or_default(),
            datacontenttype: attrs.datacontenttype,
            dataschema: attrs.dataschema,
            data,
            data_encoding: data_encoding.to_owned(),
            valid: u8::from(error.is_empty()),
            error,
            ingress_subject: subject.to_owned(),
            stream_seq: meta.stream_seq,
            received_at: datetime_secs(received_us),
            received_us: micros_u64(received_us),
            msg_key,
        }
    };
    match MeshEvent::from_message(subject, headers, payload, Limits::default()) {
        Ok(event) => {
            let attrs = RawAttributes::from_event(&event.event);
            // Same trace as the policy worker computes (derived when absent).
            let trace = (event.trace.trace_id_hex(), u8::from(event.trace_derived));
            let parent_agent = event.causation_agent.clone().unwrap_or_default();
            base(
                attrs,
                trace,
                parent_agent,
                encode_vec(event.data_bytes()),
                Some(event.mode),
                String::new(),
            )
        }
        Err(invalid) => {
            let error = invalid.to_string();
            match schemas::decode(headers, payload) {
                Ok((event, mode)) => {
                    let attrs = RawAttributes::from_event(&event);
                    let trace = fallback_trace(&attrs);
                    let parent_agent = source_agent(&attrs.causationsource);
                    base(
                        attrs,
                        trace,
                        parent_agent,
                        encode_vec(event_data(&event)),
                        Some(mode),
                        error,
                    )
                }
                Err(_) => {
                    let attrs = RawAttributes::from_raw(headers, payload);
                    let trace = fallback_trace(&attrs);
                    let parent_agent = source_agent(&attrs.causationsource);
                    base(
                        attrs,
                        trace,
                        parent_agent,
                        encode_bytes(payload),
                        None,
                        error,
                    )
                }
            }
        }
    }
}

/// One row of `decisions`: one decision receipt. (`Deserialize` too:
/// `meshctl audit verify` reads rows back to compare with their receipt.)
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct DecisionRow {
    /// The decided event's id.
    pub event_id: String,
    /// The workflow's trace id.
    pub trace_id: String,
    /// The decision's own id.
    pub decision_id: String,
    /// The publishing agent.
    pub agent: String,
    /// The event's `type`.
    pub r#type: String,
    /// The event's `target`.
    pub target: String,
    /// The event's `subject` (the tool of a tool call).
    pub subject: String,
    /// The event's `causationid`.
    pub parent_id: String,
    /// The agent of the event's `causationsource`, '' when it had none.
    pub parent_agent: String,
    /// `allow`, `deny` or `invalid` ('' when the receipt did not parse).
    pub decision: String,
    /// Ids of the determining policies.
    pub reasons: Vec<String>,
    /// Evaluation or validation errors.
    pub errors: Vec<String>,
    /// Hash of the policy set that decided.
    pub policy_hash: String,
    /// When it was decided, else when the broker received the receipt (seconds).
    pub time: u32,
    /// The same instant in microseconds.
    pub time_us: u64,
    /// Time spent deciding, in microseconds.
    pub eval_micros: u64,
    /// The ingress subject of the decided event.
    pub ingress_subject: String,
    /// 1 when the trace id was derived because the event had no `traceparent`.
    pub trace_derived: u8,
    /// The receipt as received (see `receipt_encoding`).
    pub receipt: String,
    /// `utf8` or `hex`.
    pub receipt_encoding: String,
    /// 1 when the receipt parsed.
    pub valid: u8,
    /// Why it did not, '' when it did.
    pub error: String,
    /// Its `MESH_DECISION` sequence number.
    pub stream_seq: u64,
    /// When the broker received it (seconds).
    pub received_at: u32,
    /// When the broker received it (microseconds).
    pub received_us: u64,
    /// '' for receipts naming an event id; `<stream>/<seq>` otherwise.
    pub msg_key: String,
    /// What the payload detectors found (e.g. `pii.email`).
    pub findings: Vec<String>,
    /// The shadow policy set's decision, '' when none ran.
    pub shadow_decision: String,
    /// The shadow set's determining policies.
    pub shadow_reasons: Vec<String>,
    /// The shadow set's evaluation errors.
    pub shadow_errors: Vec<String>,
    /// Hash of the shadow set, '' when none ran.
    pub shadow_policy_hash: String,
    /// The approval id, '' when the decision did not wait for a human.
    pub approval_id: String,
    /// `approved`, `rejected` or `expired`, '' without an approval.
    pub approval_status: String,
    /// Who approved or rejected.
    pub approver: String,
    /// The approver's comment, or why the request expired.
    pub approval_comment: String,
    /// What the tool-result cache did (`hit`, `miss`, `bypass`, `stored`),
    /// '' when it was not asked.
    pub cache: String,
    /// On `hit` and `stored`: the call that first produced the cached
    /// result, `<agent>/<event id>`.
    pub cache_source: String,
    /// Lowercase hex SHA-256 of the decided event's payload (signed).
    pub data_sha256: String,
    /// The signing policy worker's public key, '' on an unsigned receipt.
    pub signer: String,
    /// The receipt's Ed25519 signature (standard base64), '' when unsigned.
    pub signature: String,
    /// On a decision signed in a batch: the batch's Merkle root (hex).
    pub batch_root: String,
    /// On a decision signed in a batch: its inclusion proof.
    pub batch_proof: String,
    /// On a decision signed in a batch: the signature of the batch root.
    pub batch_signature: String,
    /// The workflow labels the decision saw.
    pub labels: Vec<String>,
    /// The labels this event added to its workflow.
    pub labels_added: Vec<String>,
    /// 1 when the workflow's label record was lost (fail closed).
    pub labels_lost: u8,
    /// The detector kinds a redacted delivery replaced.
    pub redacted: Vec<String>,
}

/// The row for one message of `MESH_DECISION`.
pub fn decision_row(subject: &str, payload: &[u8], meta: &Meta) -> DecisionRow {
    let (receipt, receipt_encoding) = encode_bytes(payload);
    let received_us = meta.received_us;
    let mut row = DecisionRow {
        event_id: String::new(),
        trace_id: String::new(),
        decision_id: String::new(),
        agent: subjects::parse_decision(subject)
            .unwrap_or_default()
            .to_owned(),
        r#type: String::new(),
        target: String::new(),
        subject: String::new(),
        parent_id: String::new(),
        parent_agent: String::new(),
        decision: String::new(),
        reasons: Vec::new(),
        errors: Vec::new(),
        policy_hash: String::new(),
        time: datetime_secs(received_us),
        time_us: micros_u64(received_us),
        eval_micros: 0,
        ingress_subject: String::new(),
        trace_derived: 0,
        receipt,
        receipt_encoding: receipt_encoding.to_owned(),
        valid: 0,
        error: String::new(),
        stream_seq: meta.stream_seq,
        received_at: datetime_secs(received_us),
        received_us: micros_u64(received_us),
        msg_key: meta.msg_key(),
        findings: Vec::new(),
        shadow_decision: String::new(),
        shadow_reasons: Vec::new(),
        shadow_errors: Vec::new(),
        shadow_policy_hash: String::new(),
        approval_id: String::new(),
        approval_status: String::new(),
        approver: String::new(),
        approval_comment: String::new(),
        cache: String::new(),
        cache_source: String::new(),
        data_sha256: String::new(),
        signer: String::new(),
        signature: String::new(),
        batch_root: String::new(),
        batch_proof: String::new(),
        batch_signature: String::new(),
        labels: Vec::new(),
        labels_added: Vec::new(),
        labels_lost: 0,
        redacted: Vec::new(),
    };
    match serde_json::from_slice::<DecisionReceipt>(payload) {
        Ok(r) => {
            let time_us = parse_rfc3339_us(&r.decided_at).unwrap_or(received_us);
            if !r.event_id.is_empty() {
                row.msg_key = String::new();
            }
            if !r.agent.is_empty() {
                row.agent = r.agent;
            }
            row.event_id = r.event_id;
            row.trace_id = r.trace_id;
            row.decision_id = r.decision_id;
            row.r#type = r.event_type;
            row.target = r.target.unwrap_or_default();
            row.subject = r.subject.unwrap_or_default();
            row.parent_id = r.causation_id.unwrap_or_default();
            row.parent_agent = r.causation_agent.unwrap_or_default();
            row.decision = r.decision.as_str().to_owned();
            row.reasons = r.reasons;
            row.errors = r.errors;
            row.policy_hash = r.policy_hash;
            row.time = datetime_secs(time_us);
            row.time_us = micros_u64(time_us);
            row.eval_micros = r.eval_micros;
            row.ingress_subject = r.ingress_subject;
            row.trace_derived = u8::from(r.trace_derived);
            row.findings = r.findings;
            row.shadow_decision = r
                .shadow_decision
                .map(|d| d.as_str().to_owned())
                .unwrap_or_default();
            row.shadow_reasons = r.shadow_reasons;
            row.shadow_errors = r.shadow_errors;
            row.shadow_policy_hash = r.shadow_policy_hash.unwrap_or_default();
            if let Some(approval) = r.approval {
                row.approval_id = approval.id;
                row.approval_status = approval.status.as_str().to_owned();
                row.approver = approval.approver;
                row.approval_comment = approval.comment;
            }
            row.cache = r.cache.map(|c| c.as_str().to_owned()).unwrap_or_default();
            row.cache_source = r.cache_source.unwrap_or_default();
            row.data_sha256 = r.data_sha256;
            row.signer = r.signer;
            row.signature = r.signature;
            row.batch_root = r.batch_root;
            row.batch_proof = r.batch_proof;
            row.batch_signature = r.batch_signature;
            row.labels = r.labels;
            row.labels_added = r.labels_added;
            row.labels_lost = u8::from(r.labels_lost);
            row.redacted = r.redacted;
            row.valid = 1;
        }
        Err(e) => row.error = format!("receipt is not a decision receipt: {e}"),
    }
    row
}

/// CloudEvents type of a lease grant ([`schemas::gpu::LEASE_GRANTED`]).
pub use schemas::gpu::LEASE_GRANTED as GPU_LEASE_GRANTED;
/// CloudEvents type of a lease release ([`schemas::gpu::LEASE_RELEASED`]).
pub use schemas::gpu::LEASE_RELEASED as GPU_LEASE_RELEASED;

/// One row of `gpu_leases`: one grant or release.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize)]
pub struct GpuLeaseRow {
    /// The CloudEvents `id`.
    pub event_id: String,
    /// The agent pool (data `pool`, else the subject token).
    pub pool: String,
    /// The GPU (data `gpu`).
    pub gpu: String,
    /// `granted` or `released` ('' when the type is neither).
    pub action: String,
    /// Who holds the lease (data `holder`).
    pub holder: String,
    /// When the lease expires (data `expires_at`; 0 when absent).
    pub expires_at: u32,
    /// The event's `time`, else when the broker received it (seconds).
    pub time: u32,
    /// The same instant in microseconds.
    pub time_us: u64,
    /// The CloudEvents `source`, e.g. `/gpu-scaler/<instance>`.
    pub source: String,
    /// The CloudEvents `type`.
    pub r#type: String,
    /// The data, whole (see `data_encoding`).
    pub data: String,
    /// `utf8` or `hex`.
    pub data_encoding: String,
    /// 1 when the event and its data were understood.
    pub valid: u8,
    /// What was wrong, '' when valid.
    pub error: String,
    /// The subject it arrived on.
    pub lease_subject: String,
    /// Its `MESH_GPU` sequence number.
    pub stream_seq: u64,
    /// When the broker received it (seconds).
    pub received_at: u32,
    /// When the broker received it (microseconds).
    pub received_us: u64,
    /// '' for events with an id; `<stream>/<seq>` for those without.
    pub msg_key: String,
}

/// The data of a lease event ([`schemas::gpu::LeaseEventData`]), read
/// leniently: a field of another JSON type is stored as its JSON text, and
/// a missing one as '', so a malformed event still gets its row.
#[derive(serde::Deserialize)]
struct LeaseData {
    pool: Option<serde_json::Value>,
    gpu: Option<serde_json::Value>,
    holder: Option<serde_json::Value>,
    expires_at: Option<String>,
}

fn json_string(v: Option<serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
    }
}

/// The row for one message of `MESH_GPU`.
pub fn gpu_lease_row(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    meta: &Meta,
) -> GpuLeaseRow {
    let received_us = meta.received_us;
    let subject_pool = subjects::parse_gpu_lease(subject)
        .unwrap_or_default()
        .to_owned();
    let mut errors = Vec::new();
    let (attrs, data) = match schemas::decode(headers, payload) {
        Ok((event, _)) => (RawAttributes::from_event(&event), event_data(&event)),
        Err(e) => {
            errors.push(e.to_string());
            (RawAttributes::from_raw(headers, payload), payload.to_vec())
        }
    };
    let action = match attrs.ty.as_str() {
        GPU_LEASE_GRANTED => "granted",
        GPU_LEASE_RELEASED => "released",
        other => {
            errors.push(format!(
                "type `{other}` is neither `{GPU_LEASE_GRANTED}` nor `{GPU_LEASE_RELEASED}`"
            ));
            ""
        }
    };
    let mut lease = LeaseData {
        pool: None,
        gpu: None,
        holder: None,
        expires_at: None,
    };
    match serde_json::from_slice::<LeaseData>(&data) {
        Ok(parsed) => lease = parsed,
        Err(e) => errors.push(format!("data is not the lease JSON: {e}")),
    }
    let pool = Some(json_string(lease.pool))
        .filter(|p| !p.is_empty())
        .unwrap_or(subject_pool);
    let expires_us = lease
        .expires_at
        .as_deref()
        .and_then(parse_rfc3339_us)
        .unwrap_or(0);
    let time_us = parse_rfc3339_us(&attrs.time).unwrap_or(received_us);
    let (data, data_encoding) = encode_vec(data);
    let msg_key = if attrs.id.is_empty() {
        meta.msg_key()
    } else {
        String::new()
    };
    GpuLeaseRow {
        event_id: attrs.id,
        pool,
        gpu: json_string(lease.gpu),
        action: action.to_owned(),
        holder: json_string(lease.holder),
        expires_at: datetime_secs(expires_us),
        time: datetime_secs(time_us),
        time_us: micros_u64(time_us),
        source: attrs.source,
        r#type: attrs.ty,
        data,
        data_encoding: data_encoding.to_owned(),
        valid: u8::from(errors.is_empty()),
        error: errors.join("; "),
        lease_subject: subject.to_owned(),
        stream_seq: meta.stream_seq,
        received_at: datetime_secs(received_us),
        received_us: micros_u64(received_us),
        msg_key,
    }
}

/// One row of `rejected`: a row ClickHouse refused, with the server's error
/// and the message it was built from, so it can be inspected, and inserted
/// again (`row` is the JSON of one row, `INSERT … FORMAT JSONEachRow`) or
/// republished (`subject`, `headers`, `payload`) once the cause is fixed.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize)]
pub struct RejectedRow {
    /// The table that refused it.
    pub table: String,
    /// ClickHouse's error.
    pub error: String,
    /// The refused row as a JSON object, one column per key.
    pub row: String,
    /// The stream the message was read from.
    pub stream: String,
    /// The subject it arrived on.
    pub subject: String,
    /// Its stream sequence number.
    pub stream_seq: u64,
    /// When the broker received it (seconds).
    pub received_at: u32,
    /// When the broker received it (microseconds).
    pub received_us: u64,
    /// The message's headers as a JSON object of name to list of values.
    pub headers: String,
    /// The message's payload (see `payload_encoding`).
    pub payload: String,
    /// `utf8` or `hex`.
    pub payload_encoding: String,
    /// When the sink quarantined it (seconds).
    pub time: u32,
    /// The same instant in microseconds.
    pub time_us: u64,
}

/// The message a row was built from, kept with the row until it is in.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The subject it arrived on.
    pub subject: String,
    /// Its headers.
    pub headers: Option<HeaderMap>,
    /// Its payload.
    pub payload: bytes::Bytes,
    /// Where it sat in its stream.
    pub meta: Meta,
}

/// The `rejected` row for `row` of `table`, refused with `error`, built
/// from `origin`, quarantined at `now_us`.
pub fn rejected_row<R: Serialize>(
    table: &str,
    row: &R,
    error: &str,
    origin: &Origin,
    now_us: i64,
) -> RejectedRow {
    let headers: serde_json::Map<String, serde_json::Value> = origin
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(name, values)| {
            let values = values.iter().map(|v| v.as_str().into()).collect();
            (name.to_string(), serde_json::Value::Array(values))
        })
        .collect();
    let (payload, payload_encoding) = encode_bytes(&origin.payload);
    RejectedRow {
        table: table.to_owned(),
        error: error.to_owned(),
        row: serde_json::to_string(row).unwrap_or_default(),
        stream: origin.meta.stream.clone(),
        subject: origin.subject.clone(),
        stream_seq: origin.meta.stream_seq,
        received_at: datetime_secs(origin.meta.received_us),
        received_us: micros_u64(origin.meta.received_us),
        headers: serde_json::Value::Object(headers).to_string(),
        payload,
        payload_encoding: payload_encoding.to_owned(),
        time: datetime_secs(now_us),
        time_us: micros_u64(now_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::{EventBuilder, EventBuilderV10, TraceParent, encode_binary, encode_structured};
    use serde_json::json;

    fn meta() -> Meta {
        Meta {
            stream: "MESH_INGRESS".into(),
            stream_seq: 7,
            received_us: 1_767_225_600_000_000, // 2026-01-01T00:00:00Z
        }
    }

    #[test]
    fn valid_event() {
        let tp = TraceParent::mint();
        let event = EventBuilderV10::new()
            .id("e1")
            .source("/agents/coder")
            .ty("io.agentmesh.tool.call")
            .subject("fs.read")
            .time("2026-02-03T04:05:06.123456Z")
            .extension("traceparent", tp.to_string())
            .extension("causationid", "e0")
            .data("application/json", json!({"path": "/tmp/x"}))
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        let row = event_row("mesh.ingress.coder.tool_call", Some(&h), &p, &meta());
        assert_eq!(row.valid, 1, "{}", row.error);
        assert_eq!(row.event_id, "e1");
        assert_eq!(row.trace_id, tp.trace_id_hex());
        assert_eq!(row.parent_id, "e0");
        assert_eq!(row.agent, "coder");
        assert_eq!(row.subject, "fs.read");
        assert_eq!(row.time_us, 1_770_091_506_123_456);
        assert_eq!(row.time, 1_770_091_506);
        assert_eq!(row.data, r#"{"path":"/tmp/x"}"#);
        assert_eq!(row.data_encoding, "utf8");
        assert_eq!(row.content_mode, "binary");
        assert_eq!(row.msg_key, "");
        assert_eq!(row.received_us, 1_767_225_600_000_000);
    }

    /// `meshctl policy replay` decides the event a row rebuilds: the row of
    /// the rebuilt event is the row it came from (text and binary data,
    /// every extension a policy reads).
    #[test]
    fn a_rebuilt_event_makes_the_row_it_came_from() {
        let tp = TraceParent::mint();
        let text = EventBuilderV10::new()
            .id("e1")
            .source("/agents/coder")
            .ty("io.agentmesh.task.handoff")
            .subject("fs.read")
            .extension("traceparent", tp.to_string())
            .extension("causationid", "e0")
            .extension("causationsource", "/agents/planner")
            .extension("target", "reviewer")
            .data("application/json", json!({"path": "/tmp/x"}))
            .build()
            .unwrap();
        let bytes = EventBuilderV10::new()
            .id("e2")
            .source("/agents/coder")
            .ty("io.agentmesh.observation")
            .data("application/octet-stream", vec![0xff, 0x00, 0xfe])
            .build()
            .unwrap();
        for (subject, event) in [
            ("mesh.ingress.coder.handoff", text),
            ("mesh.ingress.coder.observation", bytes),
        ] {
            let (h, p) = encode_binary(&event);
            let row = event_row(subject, Some(&h), &p, &meta());
            assert_eq!(row.valid, 1, "{}", row.error);
            let (h, p) = rebuild_event(&row).unwrap();
            assert_eq!(event_row(subject, Some(&h), &p, &meta()), row);
        }
        let mut bad = event_row("mesh.ingress.coder.x", None, b"", &meta());
        bad.data_encoding = ENCODING_HEX.into();
        bad.data = "zz".into();
        assert!(matches!(
            rebuild_event(&bad),
            Err(RebuildError::BadHex { .. })
        ));
    }

    #[test]
    fn receipt_bytes_undo_the_columns_encoding() {
        for payload in [&b"{\"event_id\":\"e\"}"[..], &[0xff, 0x00][..]] {
            let row = decision_row("mesh.decision.coder", payload, &meta());
            assert_eq!(receipt_bytes(&row), payload);
        }
    }

    #[test]
    fn structured_event_without_traceparent_gets_derived_trace() {
        let event = EventBuilderV10::new()
            .id("e2")
            .source("/agents/planner")
            .ty("io.agentmesh.prompt")
            .data("application/json", json!({"text": "hi"}))
            .build()
            .unwrap();
        let (h, p) = encode_structured(&event);
        let row = event_row("mesh.ingress.planner.prompt", Some(&h), &p, &meta());
        assert_eq!(row.valid, 1);
        assert_eq!(row.trace_id, TraceParent::derive("e2").trace_id_hex());
        assert_eq!(row.trace_derived, 1);
        assert_eq!(row.content_mode, "structured");
        assert_eq!(row.time_us, 1_767_225_600_000_000, "no time: broker time");
    }

    #[test]
    fn non_utf8_data_is_kept_as_hex() {
        let event = EventBuilderV10::new()
            .id("e3")
            .source("/agents/coder")
            .ty("io.agentmesh.observation")
            .data("application/octet-stream", vec![0xff, 0x00, 0xfe])
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        let row = event_row("mesh.ingress.coder.obs", Some(&h), &p, &meta());
        assert_eq!(row.valid, 1);
        assert_eq!(
            (row.data.as_str(), row.data_encoding.as_str()),
            ("ff00fe", "hex")
        );
    }

    #[test]
    fn invalid_events_still_get_rows() {
        // Source mismatch: decodes, fails validation.
        let event = EventBuilderV10::new()
            .id("e4")
            .source("/agents/mallory")
            .ty("io.agentmesh.prompt")
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        let row = event_row("mesh.ingress.coder.x", Some(&h), &p, &meta());
        assert_eq!(row.valid, 0);
        assert!(row.error.contains("does not match"), "{}", row.error);
        assert_eq!((row.event_id.as_str(), row.agent.as_str()), ("e4", "coder"));
        assert_eq!(row.trace_id, TraceParent::derive("e4").trace_id_hex());

        // Not a CloudEvent at all: payload kept, keyed by stream position.
        let row = event_row("mesh.ingress.coder.x", None, b"\xffnot an event", &meta());
        assert_eq!(row.valid, 0);
        assert_eq!(row.event_id, "");
        assert_eq!(row.msg_key, "MESH_INGRESS/7");
        assert_eq!(row.data, hex::encode(b"\xffnot an event"));

        // Binary mode with a broken header: attributes recovered from headers.
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", "1.0");
        h.insert("ce-id", "e5");
        h.insert("ce-source", "/agents/coder");
        h.insert("ce-type", "io.agentmesh.prompt");
        h.insert("ce-time", "yesterday");
        h.insert(
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let row = event_row("mesh.ingress.coder.x", Some(&h), b"hello", &meta());
        assert_eq!(row.valid, 0);
        assert_eq!(row.event_id, "e5");
        assert_eq!(row.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(row.data, "hello");
        assert_eq!(row.time_us, 1_767_225_600_000_000);

        // Structured mode that is not the JSON event format.
        let mut h = HeaderMap::new();
        h.insert("Content-Type", "application/cloudevents+json");
        let row = event_row(
            "mesh.ingress.coder.x",
            Some(&h),
            br#"{"id":"e6","specversion":"1.0"}"#,
            &meta(),
        );
        assert_eq!((row.valid, row.event_id.as_str()), (0, "e6"));
    }

    #[test]
    fn receipts() {
        let receipt = json!({
            "event_id": "e1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "decision": "deny",
            "reasons": ["forbid-shell-exec"], "errors": [], "policy_hash": "abc",
            "decision_id": "d1", "agent": "coder", "type": "io.agentmesh.tool.call",
            "subject": "shell.exec", "causation_id": "e0",
            "decided_at": "2026-02-03T04:05:06.000001Z", "eval_micros": 42,
            "ingress_subject": "mesh.ingress.coder.tool_call"
        });
        let m = Meta {
            stream: "MESH_DECISION".into(),
            ..meta()
        };
        let row = decision_row("mesh.decision.coder", receipt.to_string().as_bytes(), &m);
        assert_eq!(row.valid, 1);
        assert_eq!(row.decision, "deny");
        assert_eq!(row.reasons, vec!["forbid-shell-exec"]);
        assert_eq!(row.parent_id, "e0");
        assert_eq!(row.time_us, 1_770_091_506_000_001);
        assert_eq!(row.eval_micros, 42);
        assert_eq!(row.msg_key, "");

        assert_eq!(row.shadow_decision, "");
        assert!(row.findings.is_empty());

        // Guardrail fields: shadow decision, findings, approval.
        let mut guarded = receipt.clone();
        guarded["findings"] = json!(["pii.email"]);
        guarded["shadow_decision"] = json!("allow");
        guarded["shadow_reasons"] = json!(["members-call-low-risk-tools"]);
        guarded["shadow_policy_hash"] = json!("def");
        guarded["approval"] = json!({
            "id": "a1", "status": "rejected", "approver": "bob", "comment": "not now",
            "requested_at": "2026-02-03T04:05:00Z", "answered_at": "2026-02-03T04:05:06Z"
        });
        let row = decision_row("mesh.decision.coder", guarded.to_string().as_bytes(), &m);
        assert_eq!(row.findings, vec!["pii.email"]);
        assert_eq!(
            (
                row.shadow_decision.as_str(),
                row.shadow_policy_hash.as_str()
            ),
            ("allow", "def")
        );
        assert_eq!(row.shadow_reasons, vec!["members-call-low-risk-tools"]);
        assert_eq!(
            (
                row.approval_id.as_str(),
                row.approval_status.as_str(),
                row.approver.as_str(),
                row.approval_comment.as_str()
            ),
            ("a1", "rejected", "bob", "not now")
        );
        assert!(row.labels.is_empty() && row.redacted.is_empty());

        // Workflow labels and redaction.
        let mut flowed = receipt.clone();
        flowed["labels"] = json!(["private", "untrusted"]);
        flowed["labels_added"] = json!(["untrusted"]);
        flowed["labels_lost"] = json!(true);
        flowed["redacted"] = json!(["pii.email"]);
        let row = decision_row("mesh.decision.coder", flowed.to_string().as_bytes(), &m);
        assert_eq!(row.labels, vec!["private", "untrusted"]);
        assert_eq!(row.labels_added, vec!["untrusted"]);
        assert_eq!(row.labels_lost, 1);
        assert_eq!(row.redacted, vec!["pii.email"]);

        let row = decision_row("mesh.decision.coder", b"{oops", &m);
        assert_eq!(
            (row.valid, row.agent.as_str(), row.msg_key.as_str()),
            (0, "coder", "MESH_DECISION/7")
        );
        assert_eq!(row.receipt, "{oops");
    }

    #[test]
    fn gpu_leases() {
        let event = EventBuilderV10::new()
            .id("g1")
            .source("/gpu-scaler/a")
            .ty(GPU_LEASE_GRANTED)
            .time("2026-02-03T04:05:06Z")
            .data(
                "application/json",
                json!({"pool": "coder", "gpu": "GPU-1234", "holder": "coder-7", "expires_at": "2026-02-03T05:05:06Z"}),
            )
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        let m = Meta {
            stream: "MESH_GPU".into(),
            ..meta()
        };
        let row = gpu_lease_row("mesh.gpu.lease.coder", Some(&h), &p, &m);
        assert_eq!(row.valid, 1, "{}", row.error);
        assert_eq!(
            (row.pool.as_str(), row.gpu.as_str(), row.action.as_str()),
            ("coder", "GPU-1234", "granted")
        );
        assert_eq!(row.holder, "coder-7");
        assert_eq!(row.expires_at, 1_770_095_106);
        assert_eq!(row.time, 1_770_091_506);

        let row = gpu_lease_row("mesh.gpu.lease.coder", None, b"junk", &m);
        assert_eq!(
            (row.valid, row.pool.as_str(), row.msg_key.as_str()),
            (0, "coder", "MESH_GPU/7")
        );
    }
}

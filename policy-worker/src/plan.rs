//! The routing plan: what one decision publishes where, and what becomes
//! of the message that caused it — a plain value, built without I/O from
//! the sealed receipt and the event's bytes, and sent by `publish`.
//!
//! For an ingress event ([`event`]): the receipt on `mesh.decision.<agent>`,
//! then, for an allowed event with a target, the delivery on
//! `mesh.deliver.<target>.<agent>` (a tool call also on
//! `mesh.call.<target>.<agent>` when `MESH_CALL` exists, or the cached
//! answer in the delivery's place); for a denied or invalid event, the dead
//! letter on `mesh.dead.<agent>`; for an event that waits for a human, only
//! the request on `mesh.approval.request.<agent>.<id>` and its pending state.
//! For an answered approval ([`released`]): the final receipt and the
//! delivery or the dead letter. Every copy is keyed by the event
//! (`Nats-Msg-Id`), so a redelivered event publishes nothing twice.
//!
//! A new kind of outcome is a new [`Kind`] and the branch that adds its
//! [`Message`] (in the order JetStream must store them); `publish` sends
//! whatever the plan lists.

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, HeaderName};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use schemas::approval::{ApprovalState, approval_id};
use schemas::signing::SigningKey;
use schemas::{AgentId, ApprovalStatus, Decision, DecisionReceipt, EventType, headers, subjects};

// The names of the headers every copy gets, without parsing or allocating.
const DECISION_ID: HeaderName = HeaderName::from_static(headers::DECISION_ID);
const POLICY_HASH: HeaderName = HeaderName::from_static(headers::POLICY_HASH);
const TRACE_ID: HeaderName = HeaderName::from_static(headers::TRACE_ID);

/// What a message of a plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The decision receipt.
    Receipt,
    /// An approved tool call, stored apart on `mesh.call.<target>.<agent>`.
    Call,
    /// The event routed to its target.
    Delivery,
    /// The cached `tool.result`, to the caller, in the delivery's place.
    CachedAnswer,
    /// The denied or invalid event.
    DeadLetter,
    /// The event parked for a human.
    ApprovalRequest,
}

impl Kind {
    /// What it is, in words (for errors).
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Receipt => "the receipt",
            Self::Call => "the call copy",
            Self::Delivery => "the delivery",
            Self::CachedAnswer => "the cached answer",
            Self::DeadLetter => "the dead letter",
            Self::ApprovalRequest => "the approval request",
        }
    }
}

/// One message to store: sent as is, with `id` as its `Nats-Msg-Id`.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) kind: Kind,
    pub(crate) subject: String,
    /// `None`: no headers (the receipt is JSON alone).
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) payload: Bytes,
    pub(crate) id: String,
}

/// What becomes of the message that caused the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Ack it once everything in the plan is stored (nak it if a publish fails).
    Ack,
    /// Nak it at once, publishing nothing: JetStream redelivers it (the
    /// decision could not be signed).
    Retry,
}

/// Exactly what one decision publishes where, and what it acks.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Sent in this order, then awaited together.
    pub(crate) messages: Vec<Message>,
    /// The approval state created once the messages are stored (a parked event).
    pub(crate) pending: Option<Box<ApprovalState>>,
    /// What the metrics count once it is stored.
    pub(crate) published: telemetry::Published,
    pub(crate) settle: Settle,
}

impl Plan {
    /// Nothing published; the message is nakked and comes again.
    pub(crate) fn retry() -> Self {
        Self {
            messages: Vec::new(),
            pending: None,
            published: telemetry::Published::ReceiptOnly,
            settle: Settle::Retry,
        }
    }

    /// The kinds of its messages, in order.
    #[cfg(test)]
    pub(crate) fn kinds(&self) -> Vec<Kind> {
        self.messages.iter().map(|m| m.kind).collect()
    }
}

/// A message that is published in a copy's place: subject, headers, payload.
pub(crate) type Outgoing = (String, HeaderMap, Bytes);

/// The ingress message as the plan needs it.
#[derive(Debug)]
pub(crate) struct Ingress<'a> {
    /// The agent's subject token (`mesh.ingress.<agent>.<step>`).
    pub(crate) token: &'a str,
    /// Its sequence in `MESH_INGRESS` (keys an invalid event's copies).
    pub(crate) seq: u64,
    /// Its headers, taken from the message (the copies are built on them).
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) payload: Bytes,
}

/// The event waits for a human: when it was parked and until when.
#[derive(Debug, Clone)]
pub(crate) struct Parking {
    pub(crate) now: DateTime<Utc>,
    pub(crate) expires: DateTime<Utc>,
    /// The `policy.decision` span, so the release joins the event's trace.
    pub(crate) decision_span: Option<schemas::TraceParent>,
}

/// Where the decision sends an ingress event, besides its receipt.
#[derive(Debug)]
pub(crate) struct Route {
    /// Where an allowed event goes (`None`: nowhere, or denied).
    pub(crate) target: Option<AgentId>,
    /// Set when the allow waits for a human.
    pub(crate) parking: Option<Parking>,
    /// The cached answer of an allowed call, sealed.
    pub(crate) answer: Option<Outgoing>,
    /// Whether `MESH_CALL` exists (approved tool calls are stored there too).
    pub(crate) calls: bool,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The receipt as published: JSON, no headers, keyed `id`.
fn receipt_message(
    token: &str,
    receipt: &DecisionReceipt,
    id: &str,
) -> Result<Message, serde_json::Error> {
    // A signed receipt is 1–2 KiB: one allocation, not a doubling series.
    let mut body = Vec::with_capacity(2048);
    receipt.write_json(&mut body)?;
    Ok(Message {
        kind: Kind::Receipt,
        subject: subjects::decision(token),
        headers: None,
        payload: body.into(),
        id: id.to_owned(),
    })
}

/// The plan for an ingress event. An event is its agent and id: the same
/// agent's repeated event collapses to one receipt and one delivery via
/// `Nats-Msg-Id`, another agent's event with the same id does not. Invalid
/// events may lack an id (or reuse one a later valid event needs), so
/// theirs are keyed by the ingress sequence.
pub(crate) fn event(
    ingress: Ingress<'_>,
    r: &DecisionReceipt,
    route: Route,
) -> Result<Plan, serde_json::Error> {
    if let Some(parking) = &route.parking {
        return Ok(parked(ingress, r, parking));
    }
    let id = match r.decision {
        Decision::Invalid => format!("invalid-{}", ingress.seq),
        _ => subjects::event_key(ingress.token, &r.event_id),
    };
    let mut messages = vec![receipt_message(ingress.token, r, &id)?];
    let published = match (r.decision, &route.target, route.answer) {
        (Decision::Allow, None, _) => telemetry::Published::ReceiptOnly,
        // The cached answer takes the delivery's place and its key: a
        // redelivered call gets one answer, from the tool or the cache.
        (Decision::Allow, Some(_), Some((subject, h, payload))) => {
            messages.push(Message {
                kind: Kind::CachedAnswer,
                subject,
                headers: Some(h),
                payload,
                id,
            });
            telemetry::Published::Delivery
        }
        (Decision::Allow, Some(target), None) => {
            let call = route.calls && r.event_type == EventType::ToolCall.as_str();
            deliver(&mut messages, ingress, r, target, call, id);
            telemetry::Published::Delivery
        }
        (Decision::Deny | Decision::Invalid, _, _) => {
            messages.push(dead_letter(ingress, r, id));
            telemetry::Published::DeadLetter
        }
    };
    Ok(Plan {
        messages,
        pending: None,
        published,
        settle: Settle::Ack,
    })
}

/// The event's headers minus JetStream's `Nats-*` and whatever the agent
/// sent as `Mesh-*`, plus the decision's.
fn decided_headers(original: Option<HeaderMap>, r: &DecisionReceipt) -> HeaderMap {
    let mut h = forwardable_owned(original);
    h.insert(DECISION_ID, r.decision_id.as_str());
    h.insert(POLICY_HASH, r.policy_hash.as_str());
    h.insert(TRACE_ID, r.trace_id.as_str());
    if !r.redacted.is_empty() {
        h.insert(headers::REDACTED, r.redacted.join(","));
    }
    SigningKey::stamp(r, &mut h);
    h
}

/// The delivery to `target`. An approved tool call is also stored on
/// `mesh.call.<target>.<agent>` (`call`); its delivery names that subject,
/// so an agent reading its calls there skips the delivery, and an older
/// one answers the delivery.
fn deliver(
    messages: &mut Vec<Message>,
    ingress: Ingress<'_>,
    r: &DecisionReceipt,
    target: &AgentId,
    call: bool,
    id: String,
) {
    let mut h = decided_headers(ingress.headers, r);
    if call {
        let subject = subjects::call(target.as_str(), ingress.token);
        messages.push(Message {
            kind: Kind::Call,
            subject: subject.clone(),
            headers: Some(h.clone()),
            payload: ingress.payload.clone(),
            id: id.clone(),
        });
        h.insert(headers::CALL, subject);
    }
    messages.push(Message {
        kind: Kind::Delivery,
        subject: subjects::deliver(target.as_str(), ingress.token),
        headers: Some(h),
        payload: ingress.payload,
        id,
    });
}

/// The dead letter of a denied or invalid event: why, by which policies,
/// and where it came in.
fn dead_letter(ingress: Ingress<'_>, r: &DecisionReceipt, id: String) -> Message {
    let reason = r.errors.first().cloned().unwrap_or_else(|| {
        if r.reasons.is_empty() {
            "no policy permits this event".to_owned()
        } else {
            format!("forbidden by {}", r.reasons.join(", "))
        }
    });
    let mut h = decided_headers(ingress.headers, r);
    h.insert(headers::REASON, schemas::percent_encode_header(&reason));
    if !r.reasons.is_empty() {
        h.insert(headers::POLICIES, r.reasons.join(","));
    }
    h.insert(headers::INGRESS_SUBJECT, r.ingress_subject.as_str());
    Message {
        kind: Kind::DeadLetter,
        subject: subjects::dead(ingress.token),
        headers: Some(h),
        payload: ingress.payload,
        id,
    }
}

/// Headers the worker adds to a parked event that a delivery does not carry.
const REQUEST_ONLY: &[&str] = &[
    headers::APPROVAL_EXPIRES,
    headers::POLICIES,
    headers::INGRESS_SUBJECT,
];

/// The plan of an event that waits for a human: its request, stored byte
/// for byte with the decision's headers, then its pending state (the
/// tentative receipt); no receipt until it is answered.
fn parked(ingress: Ingress<'_>, r: &DecisionReceipt, parking: &Parking) -> Plan {
    let token = ingress.token;
    let approval = approval_id(token, &r.event_id);
    let subject = subjects::approval_request(token, &approval);
    let mut h = forwardable_owned(ingress.headers);
    h.insert(headers::DECISION_ID, r.decision_id.as_str());
    h.insert(headers::POLICY_HASH, r.policy_hash.as_str());
    h.insert(headers::TRACE_ID, r.trace_id.as_str());
    h.insert(headers::APPROVAL_ID, approval.as_str());
    h.insert(headers::APPROVAL_EXPIRES, rfc3339(parking.expires).as_str());
    h.insert(headers::POLICIES, r.reasons.join(",").as_str());
    h.insert(headers::INGRESS_SUBJECT, r.ingress_subject.as_str());
    if !r.redacted.is_empty() {
        h.insert(headers::REDACTED, r.redacted.join(","));
    }
    let state = ApprovalState {
        id: approval,
        status: ApprovalStatus::Pending,
        agent: token.to_owned(),
        request_subject: subject.clone(),
        requested_at: rfc3339(parking.now),
        expires_at: rfc3339(parking.expires),
        approver: String::new(),
        comment: String::new(),
        answered_at: String::new(),
        receipt: r.clone(),
        decision_span: parking
            .decision_span
            .map(|tp| tp.to_string())
            .unwrap_or_default(),
    };
    Plan {
        messages: vec![Message {
            kind: Kind::ApprovalRequest,
            subject,
            headers: Some(h),
            payload: ingress.payload,
            id: format!("approval-{}", subjects::event_key(token, &r.event_id)),
        }],
        pending: Some(Box::new(state)),
        published: telemetry::Published::Parked,
        settle: Settle::Ack,
    }
}

/// The plan of an answered approval: the final `receipt` (sealed) and,
/// when the parked `request` (its headers and payload) is still stored, the
/// delivery (allowed, with the approver) or the dead letter (denied, with
/// why), keyed by the event as its first decision would have been.
pub(crate) fn released(
    state: &ApprovalState,
    receipt: &DecisionReceipt,
    request: Option<(&HeaderMap, Bytes)>,
) -> Result<Plan, serde_json::Error> {
    let agent = state.agent.as_str();
    let id = subjects::event_key(agent, &receipt.event_id);
    let mut messages = vec![receipt_message(agent, receipt, &id)?];
    let copy = match (request, receipt.decision, &receipt.target) {
        (Some((request, payload)), Decision::Allow, Some(target)) => {
            let mut h = headers_without(request, REQUEST_ONLY);
            h.insert(headers::APPROVER, state.approver.as_str());
            SigningKey::stamp(receipt, &mut h);
            Some((Kind::Delivery, subjects::deliver(target, agent), h, payload))
        }
        (Some((request, payload)), Decision::Deny, _) => {
            let mut h = headers_without(request, &[headers::APPROVAL_EXPIRES]);
            SigningKey::stamp(receipt, &mut h);
            h.insert(
                headers::REASON,
                schemas::percent_encode_header(&state.denial_reason()),
            );
            Some((Kind::DeadLetter, subjects::dead(agent), h, payload))
        }
        _ => None,
    };
    let published = match copy.as_ref().map(|c| c.0) {
        Some(Kind::DeadLetter) => telemetry::Published::DeadLetter,
        Some(_) => telemetry::Published::Delivery,
        None => telemetry::Published::ReceiptOnly,
    };
    if let Some((kind, subject, h, payload)) = copy {
        messages.push(Message {
            kind,
            subject,
            headers: Some(h),
            payload,
            id,
        });
    }
    Ok(Plan {
        messages,
        pending: None,
        published,
        settle: Settle::Ack,
    })
}

/// An ingress event's headers as the mesh forwards them: without JetStream's
/// `Nats-*` (they belong to the agent's publish, not to the event) and
/// without any `Mesh-*` header (any case): those are the mesh's own, and an
/// agent must not be able to pass one off as the worker's.
pub(crate) fn forwardable(original: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in original.into_iter().flat_map(HeaderMap::iter) {
        if !forwarded(name.as_ref()) {
            continue;
        }
        for value in values {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// [`forwardable`] for headers the caller owns and publishes with its own
/// `Nats-Msg-Id` (which replaces the agent's): the map itself when nothing
/// else in it has to go, so the event's headers are not copied name by name;
/// a copy without what has to go otherwise.
pub(crate) fn forwardable_owned(original: Option<HeaderMap>) -> HeaderMap {
    match original {
        Some(map)
            if map
                .iter()
                .all(|(name, _)| *name == NATS_MESSAGE_ID || forwarded(name.as_ref())) =>
        {
            map
        }
        other => forwardable(other.as_ref()),
    }
}

/// Whether a header of an agent's event is forwarded: neither JetStream's
/// `Nats-*` nor the mesh's `Mesh-*` (any case).
fn forwarded(name: &str) -> bool {
    !(is_nats(name) || headers::is_mesh(name))
}

fn is_nats(name: &str) -> bool {
    name.get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
}

/// `original` (a parked request, whose `Mesh-*` headers are the worker's)
/// minus JetStream's `Nats-*` headers and the names in `drop`.
pub(crate) fn headers_without(original: &HeaderMap, drop: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in original.iter() {
        let key: &str = name.as_ref();
        if is_nats(key) || drop.iter().any(|d| d.eq_ignore_ascii_case(key)) {
            continue;
        }
        for value in values {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! The plan as a table over every case, without a broker.

    use schemas::CacheStatus;
    use schemas::approval::{Answer, AnswerAction};

    use super::*;

    const TOKEN: &str = "planner";
    const SEQ: u64 = 42;

    /// The event's headers as the agent sent them: CloudEvents attributes,
    /// its own `Nats-Msg-Id` and a `Mesh-*` header it has no right to.
    fn agent_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("ce-id", "e-1");
        h.insert("ce-source", "/agents/planner");
        h.insert("Nats-Msg-Id", "planner/e-1");
        h.insert(headers::APPROVER, "not the worker");
        h
    }

    fn ingress() -> Ingress<'static> {
        Ingress {
            token: TOKEN,
            seq: SEQ,
            headers: Some(agent_headers()),
            payload: Bytes::from_static(b"{\"q\":1}"),
        }
    }

    fn receipt(decision: Decision, event_type: EventType) -> DecisionReceipt {
        DecisionReceipt {
            event_id: "e-1".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            decision,
            policy_hash: "ph".into(),
            decision_id: "d-1".into(),
            agent: TOKEN.into(),
            ingress_subject: subjects::ingress(TOKEN, "plan"),
            event_type: event_type.as_str().into(),
            signer: "signer".into(),
            signature: "sig".into(),
            decided_at: "2026-12-07T16:00:00.000000Z".into(),
            ..Default::default()
        }
    }

    fn coder() -> AgentId {
        "coder".parse().unwrap()
    }

    fn answer() -> Outgoing {
        let mut h = HeaderMap::new();
        h.insert(headers::CACHE, "hit");
        (
            subjects::deliver(TOKEN, "coder"),
            h,
            Bytes::from_static(b"cached"),
        )
    }

    fn value<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.as_str())
    }

    /// One row: what the decision stages settled, and the plan expected.
    struct Case {
        name: &'static str,
        decision: Decision,
        event_type: EventType,
        /// The event's target (a denied event's is not routed).
        target: bool,
        calls: bool,
        cache: Option<CacheStatus>,
        hit: bool,
        park: bool,
        shadow: Option<Decision>,
        errors: &'static [&'static str],
        reasons: &'static [&'static str],
        /// What an `@redact` allow replaced in the payload.
        redacted: &'static [&'static str],
        expect: &'static [Kind],
        published: telemetry::Published,
    }

    const ROW: Case = Case {
        name: "",
        decision: Decision::Allow,
        event_type: EventType::Message,
        target: true,
        calls: true,
        cache: None,
        hit: false,
        park: false,
        shadow: None,
        errors: &[],
        reasons: &["p-allow"],
        redacted: &[],
        expect: &[Kind::Receipt, Kind::Delivery],
        published: telemetry::Published::Delivery,
    };

    /// One row per case; every field a row leaves out is [`ROW`]'s.
    #[rustfmt::skip]
    fn cases() -> Vec<Case> {
        use Kind::*;
        use telemetry::Published as P;
        vec![
            Case { name: "allowed, targeted", ..ROW },
            Case { name: "allowed, no target", target: false, expect: &[Receipt], published: P::ReceiptOnly, ..ROW },
            Case { name: "allowed tool call: call copy, then delivery", event_type: EventType::ToolCall, expect: &[Receipt, Call, Delivery], ..ROW },
            Case { name: "allowed tool call without MESH_CALL", event_type: EventType::ToolCall, calls: false, ..ROW },
            Case { name: "allowed tool call, no target", event_type: EventType::ToolCall, target: false, expect: &[Receipt], published: P::ReceiptOnly, ..ROW },
            Case { name: "cache miss: the call goes to the tool", event_type: EventType::ToolCall, cache: Some(CacheStatus::Miss), expect: &[Receipt, Call, Delivery], ..ROW },
            Case { name: "cache bypass", event_type: EventType::ToolCall, cache: Some(CacheStatus::Bypass), expect: &[Receipt, Call, Delivery], ..ROW },
            Case { name: "cache hit: the answer replaces delivery and call", event_type: EventType::ToolCall, cache: Some(CacheStatus::Hit), hit: true, expect: &[Receipt, CachedAnswer], ..ROW },
            Case { name: "cache stored: the result is delivered", event_type: EventType::ToolResult, cache: Some(CacheStatus::Stored), ..ROW },
            Case { name: "denied, targeted", decision: Decision::Deny, reasons: &["p-forbid", "p-2"], expect: &[Receipt, DeadLetter], published: P::DeadLetter, ..ROW },
            Case { name: "denied, no policy permits", decision: Decision::Deny, target: false, reasons: &[], expect: &[Receipt, DeadLetter], published: P::DeadLetter, ..ROW },
            Case { name: "denied tool call: no call copy", decision: Decision::Deny, event_type: EventType::ToolCall, errors: &["rate and budget counters unavailable: down"], reasons: &[], expect: &[Receipt, DeadLetter], published: P::DeadLetter, ..ROW },
            Case { name: "invalid", decision: Decision::Invalid, target: false, errors: &["not a CloudEvent"], reasons: &[], expect: &[Receipt, DeadLetter], published: P::DeadLetter, ..ROW },
            Case { name: "parked for approval", park: true, expect: &[ApprovalRequest], published: P::Parked, ..ROW },
            Case { name: "parked tool call: no call copy yet", park: true, event_type: EventType::ToolCall, expect: &[ApprovalRequest], published: P::Parked, ..ROW },
            Case { name: "shadow denies: no effect", shadow: Some(Decision::Deny), ..ROW },
            Case { name: "redacted delivery", redacted: &["pii", "secret"], ..ROW },
            Case { name: "redacted tool call", event_type: EventType::ToolCall, redacted: &["pii"], expect: &[Receipt, Call, Delivery], ..ROW },
            Case { name: "redacted, parked", park: true, redacted: &["pii"], expect: &[ApprovalRequest], published: P::Parked, ..ROW },
            Case { name: "shadow allows a denied event: no effect", decision: Decision::Deny, shadow: Some(Decision::Allow), reasons: &[], expect: &[Receipt, DeadLetter], published: P::DeadLetter, ..ROW },
        ]
    }

    fn plan_of(case: &Case) -> (DecisionReceipt, Plan) {
        let mut r = receipt(case.decision, case.event_type);
        r.errors = case.errors.iter().map(|e| e.to_string()).collect();
        r.reasons = case.reasons.iter().map(|e| e.to_string()).collect();
        r.cache = case.cache;
        r.shadow_decision = case.shadow;
        r.redacted = case.redacted.iter().map(|k| k.to_string()).collect();
        r.target = case.target.then(|| "coder".to_owned());
        let now = DateTime::parse_from_rfc3339("2026-12-07T16:00:00Z")
            .unwrap()
            .to_utc();
        let route = Route {
            target: (case.target && case.decision == Decision::Allow).then(coder),
            parking: case.park.then(|| Parking {
                now,
                expires: now + chrono::Duration::hours(1),
                decision_span: None,
            }),
            answer: case.hit.then(answer),
            calls: case.calls,
        };
        let plan = event(ingress(), &r, route).unwrap();
        (r, plan)
    }

    #[test]
    fn every_case_publishes_exactly_what_its_row_says() {
        for case in cases() {
            let (r, plan) = plan_of(&case);
            let name = case.name;
            assert_eq!(plan.kinds(), case.expect, "{name}");
            assert_eq!(plan.published, case.published, "{name}");
            assert_eq!(plan.settle, Settle::Ack, "{name}");
            assert_eq!(plan.pending.is_some(), case.park, "{name}");
            let key = match case.decision {
                Decision::Invalid => format!("invalid-{SEQ}"),
                _ => subjects::event_key(TOKEN, "e-1"),
            };
            for m in &plan.messages {
                let subject = match m.kind {
                    Kind::Receipt => subjects::decision(TOKEN),
                    Kind::Call => subjects::call("coder", TOKEN),
                    Kind::Delivery => subjects::deliver("coder", TOKEN),
                    Kind::CachedAnswer => answer().0,
                    Kind::DeadLetter => subjects::dead(TOKEN),
                    Kind::ApprovalRequest => {
                        subjects::approval_request(TOKEN, &approval_id(TOKEN, "e-1"))
                    }
                };
                assert_eq!(m.subject, subject, "{name}: {:?}", m.kind);
                let id = match m.kind {
                    Kind::ApprovalRequest => format!("approval-{key}"),
                    _ => key.clone(),
                };
                assert_eq!(m.id, id, "{name}: {:?}", m.kind);
                let called = plan.kinds().contains(&Kind::Call);
                check_message(name, &r, m, called);
            }
        }
    }

    /// What every message of a kind carries, whatever the case.
    fn check_message(name: &str, r: &DecisionReceipt, m: &Message, called: bool) {
        let kind = m.kind;
        if kind == Kind::Receipt {
            assert!(m.headers.is_none(), "{name}");
            let published: DecisionReceipt = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(
                &published, r,
                "{name}: the receipt as decided, shadow and cache included"
            );
            return;
        }
        let h = m.headers.as_ref().unwrap();
        if kind == Kind::CachedAnswer {
            assert_eq!(value(h, headers::CACHE), Some("hit"), "{name}");
            assert_eq!(m.payload, Bytes::from_static(b"cached"), "{name}");
            return;
        }
        assert_eq!(m.payload, ingress().payload, "{name}: byte for byte");
        assert_eq!(value(h, "ce-id"), Some("e-1"), "{name}: {kind:?}");
        assert_eq!(
            value(h, headers::DECISION_ID),
            Some("d-1"),
            "{name}: {kind:?}"
        );
        assert_eq!(
            value(h, headers::TRACE_ID),
            Some(r.trace_id.as_str()),
            "{name}"
        );
        assert_eq!(value(h, headers::POLICY_HASH), Some("ph"), "{name}");
        assert!(
            value(h, headers::APPROVER).is_none(),
            "{name}: {kind:?} forwards an agent's Mesh-* header"
        );
        let stamped = value(h, headers::SIGNATURE) == Some("sig");
        assert_eq!(stamped, kind != Kind::ApprovalRequest, "{name}: {kind:?}");
        // A delivery names the call copy stored beside it.
        let call = subjects::call("coder", TOKEN);
        assert_eq!(
            value(h, headers::CALL),
            (kind == Kind::Delivery && called).then_some(call.as_str()),
            "{name}: {kind:?}"
        );
        let redacted = r.redacted.join(",");
        assert_eq!(
            value(h, headers::REDACTED),
            (!redacted.is_empty()).then_some(redacted.as_str()),
            "{name}: {kind:?} says what was redacted"
        );
        let dead = kind == Kind::DeadLetter;
        assert_eq!(value(h, headers::REASON).is_some(), dead, "{name}");
        assert_eq!(
            value(h, headers::INGRESS_SUBJECT),
            (dead || kind == Kind::ApprovalRequest).then_some(r.ingress_subject.as_str()),
            "{name}: {kind:?}"
        );
    }

    #[test]
    fn a_dead_letter_says_why() {
        for (errors, reasons, why, policies) in [
            (&[][..], &[][..], "no policy permits this event", None),
            (
                &[],
                &["p-1", "p-2"],
                "forbidden by p-1, p-2",
                Some("p-1,p-2"),
            ),
            (&["counters down"], &["p-1"], "counters down", Some("p-1")),
        ] {
            let mut r = receipt(Decision::Deny, EventType::Message);
            r.errors = errors.iter().map(|e: &&str| e.to_string()).collect();
            r.reasons = reasons.iter().map(|e: &&str| e.to_string()).collect();
            let route = Route {
                target: None,
                parking: None,
                answer: None,
                calls: true,
            };
            let plan = event(ingress(), &r, route).unwrap();
            let h = plan.messages.get(1).unwrap().headers.as_ref().unwrap();
            let encoded = schemas::percent_encode_header(why);
            assert_eq!(value(h, headers::REASON), Some(encoded.as_str()), "{why}");
            assert_eq!(value(h, headers::POLICIES), policies, "{why}");
        }
    }

    #[test]
    fn a_parked_event_stores_its_request_and_then_its_pending_state() {
        let case = Case {
            park: true,
            reasons: &["p-approve"],
            ..ROW
        };
        let (r, plan) = plan_of(&case);
        let request = plan.messages.first().unwrap();
        let h = request.headers.as_ref().unwrap();
        let id = approval_id(TOKEN, "e-1");
        assert_eq!(value(h, headers::APPROVAL_ID), Some(id.as_str()));
        assert_eq!(
            value(h, headers::APPROVAL_EXPIRES),
            Some("2026-12-07T17:00:00.000000Z")
        );
        assert_eq!(value(h, headers::POLICIES), Some("p-approve"));
        assert!(
            value(h, "Nats-Msg-Id").is_none(),
            "the agent's key is replaced by the plan's"
        );
        let state = plan.pending.unwrap();
        assert_eq!(state.id, id);
        assert_eq!(state.status, ApprovalStatus::Pending);
        assert_eq!(state.agent, TOKEN);
        assert_eq!(state.request_subject, request.subject);
        assert_eq!(state.requested_at, "2026-12-07T16:00:00.000000Z");
        assert_eq!(state.expires_at, "2026-12-07T17:00:00.000000Z");
        assert_eq!(state.receipt, r, "the tentative receipt, released later");
    }

    #[test]
    fn a_decision_that_cannot_be_signed_publishes_nothing_and_comes_again() {
        let plan = Plan::retry();
        assert!(plan.messages.is_empty() && plan.pending.is_none());
        assert_eq!(plan.settle, Settle::Retry);
    }

    /// A parked event's state, answered `action`, and its request as stored.
    fn answered(action: AnswerAction) -> (ApprovalState, HeaderMap) {
        let (_, parked) = plan_of(&Case { park: true, ..ROW });
        let mut request = parked.messages.first().unwrap().headers.clone().unwrap();
        request.insert("Nats-Msg-Id", "approval-planner/e-1");
        let state = parked.pending.unwrap();
        let answer = Answer {
            id: state.id.clone(),
            action,
            approver: "alice".into(),
            comment: "ok".into(),
            at: String::new(),
        };
        let at = DateTime::parse_from_rfc3339("2026-12-07T16:30:00Z")
            .unwrap()
            .to_utc();
        (state.answered(&answer, at), request)
    }

    #[test]
    fn a_released_approval_publishes_its_receipt_and_its_copy() {
        use Kind::*;
        use telemetry::Published as P;
        for (action, stored, target, expect, published) in [
            (
                AnswerAction::Approve,
                true,
                true,
                &[Receipt, Delivery][..],
                P::Delivery,
            ),
            (
                AnswerAction::Approve,
                true,
                false,
                &[Receipt],
                P::ReceiptOnly,
            ),
            (
                AnswerAction::Reject,
                true,
                true,
                &[Receipt, DeadLetter],
                P::DeadLetter,
            ),
            (
                AnswerAction::Expire,
                true,
                true,
                &[Receipt, DeadLetter],
                P::DeadLetter,
            ),
            (
                AnswerAction::Approve,
                false,
                true,
                &[Receipt],
                P::ReceiptOnly,
            ),
        ] {
            let row = format!("{action:?}, request stored: {stored}, target: {target}");
            let (state, request) = answered(action);
            let mut r = state.final_receipt();
            if !target {
                r.target = None;
            }
            let request = stored.then(|| (&request, Bytes::from_static(b"{\"q\":1}")));
            let plan = released(&state, &r, request).unwrap();
            assert_eq!(plan.kinds(), expect, "{row}");
            assert_eq!(plan.published, published, "{row}");
            assert!(plan.pending.is_none(), "{row}");
            let key = subjects::event_key(TOKEN, "e-1");
            assert!(plan.messages.iter().all(|m| m.id == key), "{row}");
            let published: DecisionReceipt =
                serde_json::from_slice(&plan.messages.first().unwrap().payload).unwrap();
            assert_eq!(published, r, "{row}");
            let Some(copy) = plan.messages.get(1) else {
                continue;
            };
            let h = copy.headers.as_ref().unwrap();
            assert!(value(h, "Nats-Msg-Id").is_none(), "{row}");
            assert!(value(h, headers::APPROVAL_EXPIRES).is_none(), "{row}");
            assert_eq!(
                value(h, headers::APPROVAL_ID),
                Some(state.id.as_str()),
                "{row}"
            );
            assert_eq!(
                value(h, headers::DECISION),
                Some(r.decision.as_str()),
                "{row}"
            );
            if copy.kind == Delivery {
                assert_eq!(copy.subject, subjects::deliver("coder", TOKEN), "{row}");
                assert_eq!(value(h, headers::APPROVER), Some("alice"), "{row}");
                assert!(value(h, headers::POLICIES).is_none(), "{row}");
                assert!(value(h, headers::INGRESS_SUBJECT).is_none(), "{row}");
            } else {
                assert_eq!(copy.subject, subjects::dead(TOKEN), "{row}");
                let why = schemas::percent_encode_header(&state.denial_reason());
                assert_eq!(value(h, headers::REASON), Some(why.as_str()), "{row}");
                assert!(value(h, headers::INGRESS_SUBJECT).is_some(), "{row}");
            }
        }
    }

    #[test]
    fn an_owned_map_is_forwarded_as_is_unless_something_in_it_has_to_go() {
        let mut clean = HeaderMap::new();
        clean.insert("ce-id", "e-1");
        clean.insert("ce-source", "/agents/planner");
        // The worker's publish replaces it with its own.
        clean.insert("Nats-Msg-Id", "planner/e-1");
        assert_eq!(forwardable_owned(Some(clean.clone())), clean);
        assert!(forwardable_owned(None).is_empty());

        // Any other `Nats-*` (or this one in another case) and any `Mesh-*`:
        // a copy without them, as `forwardable` makes.
        for name in [
            "Mesh-Decision",
            "mesh-signer",
            "Nats-Expected-Stream",
            "nats-msg-id",
        ] {
            let mut h = clean.clone();
            h.insert(name, "from the agent");
            let forwarded = forwardable_owned(Some(h.clone()));
            assert_eq!(forwarded, forwardable(Some(&h)), "{name}");
            assert!(
                forwarded
                    .iter()
                    .all(|(n, _)| !is_nats(n.as_ref()) && !headers::is_mesh(n.as_ref())),
                "{name}: {forwarded:?}"
            );
            assert_eq!(forwarded.get("ce-id").map(|v| v.as_str()), Some("e-1"));
        }
    }
}

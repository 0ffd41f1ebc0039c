//! The mesh's spans, named and shaped in one place, and how they join the
//! trace an event carries in its `traceparent`.
//!
//! | span | service | parent / links |
//! |---|---|---|
//! | `policy.decision` | policy-worker | the event's `traceparent` (remote parent) |
//! | `policy.delivery` | policy-worker | the decision span; publishing the receipt and the routed or dead-lettered copy |
//! | `audit.batch` | audit-sink | a root span with one link per event in the batch (up to [`MAX_LINKS`]) |
//! | `gpu.scaling` | gpu-scaler | a root span per scaling round, with one event per lease decision |
//!
//! All use the target [`TARGET`]; only that target is exported, and log
//! lines leave these spans out. When tracing is off the spans are disabled
//! and every helper here returns at once.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use schemas::TraceParent;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every mesh span.
pub const TARGET: &str = "agentmesh";

/// The most links one `audit.batch` span carries.
pub const MAX_LINKS: usize = 128;

/// The remote span context an event's `traceparent` (and `tracestate`)
/// names: what the W3C Trace Context propagator reads from them, built from
/// the parsed `TraceParent` without formatting and parsing it again. Only
/// the sampled flag is kept, as the propagator does; a `tracestate` that
/// does not parse is dropped.
pub fn remote_context(traceparent: &TraceParent, tracestate: Option<&str>) -> SpanContext {
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(traceparent.trace_id),
        SpanId::from_bytes(traceparent.parent_id),
        TraceFlags::new(traceparent.flags) & TraceFlags::SAMPLED,
        true,
        state,
    )
}

/// The `policy.decision` span of one ingress event, not yet joined to a
/// trace: create it when the event arrives, [`join`] it once the event's
/// trace is known, before entering it.
pub fn decision(subject: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        parent: None,
        "policy.decision",
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.destination.name = subject,
        event_id = Empty,
        trace_id = Empty,
        decision = Empty,
        policy_hash = Empty,
    )
}

/// Makes `span` a child of the event's trace. Call it before the span is
/// entered or has children.
pub fn join(span: &Span, traceparent: &TraceParent, tracestate: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let remote = remote_context(traceparent, tracestate);
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// Makes `span` a child of the trace `event` carries (its `traceparent` and
/// `tracestate`, or the trace derived from its id when it has none).
pub fn join_event(span: &Span, event: &schemas::MeshEvent) {
    if span.is_disabled() {
        return;
    }
    let tracestate = event
        .event
        .extension(schemas::ext::TRACESTATE)
        .map(|v| v.to_string())
        .filter(|_| !event.trace_derived);
    join(span, &event.trace, tracestate.as_deref());
}

/// Records the outcome on a `policy.decision` span.
pub fn record_decision(
    span: &Span,
    event_id: &str,
    trace_id: &str,
    decision: &str,
    policy_hash: &str,
) {
    if span.is_disabled() {
        return;
    }
    span.record("event_id", event_id);
    span.record("trace_id", trace_id);
    span.record("decision", decision);
    span.record("policy_hash", policy_hash);
}

/// The `policy.delivery` span: publishing the receipt and the routed or
/// dead-lettered copy, as a child of the decision.
pub fn delivery(decision: &Span) -> Span {
    tracing::info_span!(
        target: TARGET,
        parent: decision,
        "policy.delivery",
        otel.kind = "producer",
        messaging.system = "nats",
    )
}

/// The `policy.approval` span: publishing the receipt and the delivery or
/// dead letter of a parked event once it is answered or expired. A child of
/// the event's `policy.decision` span when that span's context was kept when
/// the event was parked (`decision`), so the release lands in the event's
/// trace however much later it comes; a root otherwise.
pub fn approval(
    decision: Option<&TraceParent>,
    approval_id: &str,
    status: &str,
    event_id: &str,
    trace_id: &str,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "policy.approval",
        otel.kind = "producer",
        messaging.system = "nats",
        approval_id,
        approval_status = status,
        event_id,
        trace_id,
    );
    if let Some(decision) = decision {
        join(&span, decision, None);
    }
    span
}

/// The `audit.batch` span of one table's batch: create it when the batch
/// opens, [`link`] each event to it, drop it once the batch is inserted.
pub fn sink_batch(table: &'static str) -> Span {
    tracing::info_span!(
        target: TARGET,
        parent: None,
        "audit.batch",
        otel.kind = "consumer",
        db.system = "clickhouse",
        db.collection.name = table,
        rows = Empty,
        insert_errors = Empty,
    )
}

/// Links `span` to the event whose `traceparent` is `tp` (the caller keeps
/// a batch to [`MAX_LINKS`]).
pub fn link(span: &Span, tp: &TraceParent) {
    if span.is_disabled() {
        return;
    }
    span.add_link(remote_context(tp, None));
}

/// The `gpu.scaling` span of one scaling round (a root: rounds follow queue
/// depth, not one event). Record each lease decision with
/// [`scaling_decision`] while it is entered; its context, from
/// [`traceparent`], can stamp the lease events it causes.
pub fn scaling_round(instance: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        parent: None,
        "gpu.scaling",
        otel.kind = "internal",
        instance = instance,
        granted = Empty,
        released = Empty,
    )
}

/// One lease decision inside the current `gpu.scaling` span.
pub fn scaling_decision(pool: &str, gpu: &str, action: &str) {
    tracing::info!(target: TARGET, pool, gpu, action, "gpu.lease");
}

/// The W3C `traceparent` of `span`, when it is exported and sampled in; use
/// it to carry the mesh's span to what it publishes.
pub fn traceparent(span: &Span) -> Option<TraceParent> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        parent_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::{Extractor, TextMapPropagator};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    /// A carrier holding only the W3C headers of one event.
    struct W3cCarrier<'a> {
        traceparent: &'a str,
        tracestate: Option<&'a str>,
    }

    impl Extractor for W3cCarrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                "traceparent" => Some(self.traceparent),
                "tracestate" => self.tracestate,
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            let mut keys = vec!["traceparent"];
            if self.tracestate.is_some() {
                keys.push("tracestate");
            }
            keys
        }
    }

    /// What the W3C propagator reads from the two headers.
    fn propagated(traceparent: &str, tracestate: Option<&str>) -> SpanContext {
        TraceContextPropagator::new()
            .extract(&W3cCarrier {
                traceparent,
                tracestate,
            })
            .span()
            .span_context()
            .clone()
    }

    #[test]
    fn remote_context_is_what_the_propagator_reads() {
        for (traceparent, tracestate) in [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vendor=1,other=two"),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",
                Some("not a state"),
            ),
        ] {
            let tp: TraceParent = traceparent.parse().unwrap();
            assert_eq!(
                remote_context(&tp, tracestate),
                propagated(traceparent, tracestate),
                "{traceparent} {tracestate:?}"
            );
        }
    }

    #[test]
    fn the_propagator_reads_the_events_traceparent() {
        let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let sc = remote_context(&tp, Some("vendor=1"));
        assert!(sc.is_valid());
        assert!(sc.is_remote());
        assert!(sc.is_sampled());
        assert_eq!(sc.trace_id().to_bytes(), tp.trace_id);
        assert_eq!(sc.span_id().to_bytes(), tp.parent_id);
        assert_eq!(sc.trace_state().get("vendor"), Some("1"));
    }

    #[test]
    fn helpers_are_no_ops_without_a_subscriber() {
        let tp = TraceParent::mint();
        let span = decision("mesh.ingress.a.b");
        join(&span, &tp, None);
        record_decision(&span, "e1", &tp.trace_id_hex(), "allow", "h");
        link(&sink_batch("events"), &tp);
        assert_eq!(traceparent(&span), None);
    }
}

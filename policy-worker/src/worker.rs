//! The per-event path, in stages: read the message (decode and validate),
//! decide (guardrails and Cedar, the cache, the signature) in the event's
//! `policy.decision` span, plan what to publish where (`plan`, a plain
//! value), publish it (`publish`) in the `policy.delivery` span, then settle
//! (ack the ingress message once everything is stored, or nak it).
//!
//! Throughput comes from batched pulls and many events in flight at once:
//! publishes are sent asynchronously and their JetStream acks awaited
//! together, so no event blocks on another's round trip. Each event is
//! decided on a task of its own on the multi-threaded runtime, so decoding,
//! Cedar and serialisation use every core; the consume loop only pulls and
//! bounds how many are in flight. The order of work within one event is
//! unchanged: the ingress message is acked only after its receipt and its
//! delivery or dead letter are stored.
//!
//! Every event's task is the future of [`Worker::handle`], moved as a
//! whole when it is spawned and finished, so it is kept small: what only
//! some events await (the KV round trips of counters, workflow labels, the
//! cache, approvals and agent cards, erasing an original) is boxed where it
//! is awaited instead of being laid out inside every event's task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use schemas::approval::ApprovalState;
use schemas::{Decision, DecisionReceipt, MeshEvent, RawAttributes, subjects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::cache::{Lookup, ToolCache};
use crate::cards::Cards;
use crate::plan::{self, Ingress, Plan, Route, Settle};
use crate::signing::Sealer;
use crate::watermarks::Watermarks;
use crate::{Config, Error};
use crate::{guard, publish};
use policy_engine::PolicyBundle;

/// Creates (or finds) the durable pull consumer on `MESH_INGRESS`.
pub(crate) async fn ingress_consumer(
    js: &jetstream::Context,
    config: &Config,
) -> Result<PullConsumer, Error> {
    let err = |source: async_nats::Error| Error::Consumer {
        name: config.consumer.clone(),
        source,
    };
    let stream = js
        .get_stream(subjects::STREAM_INGRESS)
        .await
        .map_err(|e| err(e.into()))?;
    stream
        .get_or_create_consumer(
            &config.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(config.consumer.clone()),
                description: Some("policy worker: one decision per ingress event".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait(),
                max_ack_pending: (config.max_in_flight * 4).max(1024) as i64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| err(e.into()))
}

/// Shared state of the per-event path.
pub(crate) struct Worker {
    js: jetstream::Context,
    policies: watch::Receiver<Arc<PolicyBundle>>,
    guard: guard::Runtime,
    cache: Arc<ToolCache>,
    /// The input schemas of the agents' cards.
    cards: Arc<Cards>,
    limits: schemas::Limits,
    batch: usize,
    max_in_flight: usize,
    grace: Duration,
    metrics: telemetry::WorkerMetrics,
    /// Whether `MESH_CALL` exists: approved tool calls are then stored
    /// there too, so agents read them apart from their other deliveries.
    calls: bool,
    /// Signs each decision once (receipt and copy share the signature).
    sealer: Sealer,
    /// The last message stored per stream, checked for losses.
    pub(crate) watermarks: Arc<Watermarks>,
    /// Whether the originals of redacted deliveries are erased from
    /// `MESH_INGRESS` (`--redacted-original drop`).
    erase_originals: bool,
}

impl Worker {
    #[expect(
        clippy::too_many_arguments,
        reason = "each is one shared piece of the per-event path, built by `run`"
    )]
    pub(crate) fn new(
        js: jetstream::Context,
        policies: watch::Receiver<Arc<PolicyBundle>>,
        guard: guard::Runtime,
        cache: Arc<ToolCache>,
        cards: Arc<Cards>,
        config: &Config,
        metrics: telemetry::WorkerMetrics,
        calls: bool,
        sealer: Sealer,
    ) -> Arc<Self> {
        Arc::new(Self {
            policies,
            guard,
            cache,
            cards,
            limits: config.limits(),
            batch: config.batch.max(1),
            max_in_flight: config.max_in_flight.max(1),
            grace: config.grace,
            metrics,
            calls,
            sealer,
            watermarks: Arc::default(),
            erase_originals: config.redacted_original == broker_config::RedactedOriginal::Drop,
            js,
        })
    }

    /// Consumes until `shutdown`, then lets in-flight events finish within
    /// the grace period.
    pub(crate) async fn consume(
        self: Arc<Self>,
        consumer: PullConsumer,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let messages = match consumer
                .stream()
                .max_messages_per_batch(self.batch)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(messages) => {
                    backoff = Duration::from_millis(100);
                    messages
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "Cannot pull from MESH_INGRESS; retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if !self.clone().work(messages, &shutdown).await {
                break;
            }
        }
    }

    /// Decides the events of one pull until it ends or `shutdown`; `false`
    /// when the events in flight did not finish within the grace period.
    async fn work(
        self: Arc<Self>,
        messages: jetstream::consumer::pull::Stream,
        shutdown: &CancellationToken,
    ) -> bool {
        let this = self.clone();
        let work = messages
            .take_until(shutdown.clone().cancelled_owned())
            .filter_map(|message| async move {
                match message {
                    Ok(message) => Some(message),
                    Err(error) => {
                        tracing::warn!(%error, "Pull from MESH_INGRESS failed; continuing.");
                        None
                    }
                }
            })
            // Each event is decided on its own task, so decoding, Cedar
            // and serialisation spread over every worker thread of the
            // runtime; this loop only pulls and bounds what is in flight.
            // Dropping the handle (grace period over) aborts the event,
            // which JetStream then redelivers.
            .map(|message| AbortOnDropHandle::new(tokio::spawn(this.clone().handle(message))))
            .buffer_unordered(self.max_in_flight)
            .for_each(|_joined| async {});
        let grace = self.grace;
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = work => true,
            () = deadline => {
                tracing::warn!(?grace, "In-flight events did not finish within the grace period; terminating now (they will be redelivered).");
                false
            }
        }
    }

    /// Decides one ingress message and acks it once every publish is
    /// stored. The stages: read it, decide (in the event's
    /// `policy.decision` span), plan what to publish, publish (in its
    /// `policy.delivery` span), settle (ack or nak).
    async fn handle(self: Arc<Self>, mut message: jetstream::Message) {
        let started = Instant::now();
        self.metrics.received();
        let read = Read::of(&message, self.limits);
        let span = read.span();
        let (receipt, route, redacted) = self
            .decide(&read, &message.payload, started)
            .instrument(span.clone())
            .await;
        // An `@redact` allow: every copy carries the redacted payload (the
        // original stays in MESH_INGRESS, which the audit records).
        if let Some(redacted) = redacted {
            message.message.payload = redacted;
        }
        telemetry::spans::record_decision(
            &span,
            &receipt.event_id,
            &receipt.trace_id,
            receipt.decision.as_str(),
            &receipt.policy_hash,
        );
        let plan = match route {
            Some(mut route) => {
                if let Some(parking) = &mut route.parking {
                    parking.decision_span = telemetry::spans::traceparent(&span);
                }
                span.in_scope(|| self.plan(&mut message, &read, &receipt, route))
            }
            None => Plan::retry(),
        };
        let stored = match plan.settle {
            Settle::Ack => Some(
                self.store(plan.messages, plan.pending)
                    .instrument(telemetry::spans::delivery(&span))
                    .await,
            ),
            Settle::Retry => None,
        };
        let stored = match stored {
            Some(Ok(())) if self.erase_originals && !receipt.redacted.is_empty() => {
                Some(Box::pin(erase_original(&self.js, read.seq, &receipt)).await)
            }
            stored => stored,
        };
        self.settle(message, stored, plan.published, &receipt).await;
    }

    /// The decision on `read`: the verdict of the active (and shadow) set,
    /// the cache's answer for an allowed call, the redacted payload of an
    /// `@redact` allow, and the receipt sealed. Without a route when the
    /// decision could not be signed or the workflow's labels not stored:
    /// fail closed, nothing is published or acked and JetStream redelivers
    /// the event.
    async fn decide(
        &self,
        read: &Read,
        payload: &bytes::Bytes,
        started: Instant,
    ) -> (DecisionReceipt, Option<Route>, Option<bytes::Bytes>) {
        let bundle = self.policies.borrow().clone();
        let mut receipt = read.receipt(&bundle);
        let decided = match &read.event {
            Ok(event) => self.verdict(&bundle, event, read, &mut receipt).await,
            Err(invalid) => {
                invalid.record(&mut receipt);
                self.guard.mark_invalid(&mut receipt);
                Some((None, false, Vec::new()))
            }
        };
        let Some((mut target, park, redact)) = decided else {
            return (receipt, None, None);
        };
        let mut redacted = None;
        if let (Ok(event), Some(_), false) = (&read.event, &target, redact.is_empty()) {
            redacted = redaction(event, payload, &redact, &mut receipt);
            if receipt.decision != Decision::Allow {
                target = None;
            }
        }
        let evaluation = started.elapsed();
        receipt.eval_micros = evaluation.as_micros() as u64;
        self.metrics.decided(receipt.decision, evaluation);
        // The cache is asked only about what is allowed and routed now: a
        // denied call never touches it, a parked one is released later.
        let mut answer = None;
        if let (Ok(event), Some(_), false) = (&read.event, &target, park) {
            let storable = redacted.is_none();
            answer = self
                .consult_cache(&bundle, event, storable, &mut receipt)
                .await;
        }
        receipt.decided_at =
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let signed = redacted.as_ref().unwrap_or(payload);
        if !self.seal(&mut receipt, &mut answer, signed).await {
            return (receipt, None, None);
        }
        let parking = park.then(|| self.guard.approvals.parking(chrono::Utc::now()));
        let route = Route {
            target,
            parking,
            answer,
            calls: self.calls,
        };
        (receipt, Some(route), redacted)
    }

    /// Decides a valid event with the guardrails and records the verdict
    /// on `receipt`; returns where an allowed event goes, whether it waits
    /// for a human and what it redacts. `None`: the workflow's labels
    /// could not be stored (logged here).
    async fn verdict(
        &self,
        bundle: &PolicyBundle,
        event: &MeshEvent,
        read: &Read,
        receipt: &mut DecisionReceipt,
    ) -> Option<(Option<schemas::AgentId>, bool, Vec<String>)> {
        let step = subjects::parse_ingress(&read.subject).map_or("", |p| p.step);
        record_event(event, receipt);
        // A call whose arguments break its tool's input schema is invalid
        // (the receipt's decision stays so) and reaches no guardrail or policy.
        if let Err(violations) = self.cards.check(event).await {
            receipt.reasons = vec![policy_engine::INPUT_SCHEMA.to_owned()];
            receipt.errors = violations;
            self.guard.mark_invalid(receipt);
            return Some((None, false, Vec::new()));
        }
        let outcome = match self.guard.decide(bundle, event, step, receipt).await {
            Ok(outcome) => outcome,
            Err(error) => {
                self.metrics.publish_failed();
                tracing::warn!(event_id = %event.id(), %error, "Storing the workflow's labels failed; the event will be redelivered.");
                return None;
            }
        };
        let verdict = outcome.verdict;
        receipt.decision = if verdict.allowed {
            Decision::Allow
        } else {
            Decision::Deny
        };
        receipt.reasons = verdict.reasons;
        receipt.errors = verdict.errors;
        let target = verdict.allowed.then(|| event.target.clone()).flatten();
        Some((target, outcome.park, outcome.redact))
    }

    /// Asks the cache about an allowed, routed event: records `miss`,
    /// `bypass`, `hit` or `stored` on the receipt and returns the cached
    /// answer of a hit. A result that is not `storable` (delivered
    /// redacted: the cache would keep and serve its original) ends its
    /// call's flight without being stored.
    async fn consult_cache(
        &self,
        bundle: &PolicyBundle,
        event: &MeshEvent,
        storable: bool,
        receipt: &mut DecisionReceipt,
    ) -> Option<plan::Outgoing> {
        let rules = bundle.cache();
        if rules.is_empty() {
            return None;
        }
        let mut answer = None;
        match Box::pin(self.cache.lookup(rules, event)).await {
            Lookup::NotCacheable => {}
            Lookup::Deliver(status) => receipt.cache = Some(status),
            Lookup::Hit(hit) => {
                receipt.cache = Some(schemas::CacheStatus::Hit);
                receipt.cache_source = Some(hit.source().to_owned());
                answer = Some(hit.message(event, receipt));
            }
        }
        if let Some(source) = Box::pin(self.cache.fill(rules, event, storable)).await {
            receipt.cache = Some(schemas::CacheStatus::Stored);
            receipt.cache_source = Some(source);
        }
        answer
    }

    /// Signs the decision (and the cached answer, if any); `false` when it
    /// could not be signed (counted and logged here).
    async fn seal(
        &self,
        receipt: &mut DecisionReceipt,
        answer: &mut Option<plan::Outgoing>,
        payload: &[u8],
    ) -> bool {
        let mut sealed = self.sealer.seal(receipt, payload).await;
        if let (Ok(()), Some((_, h, payload))) = (&sealed, answer) {
            sealed = Box::pin(self.sealer.seal_answer(receipt, h, payload)).await;
        }
        let Err(error) = sealed else { return true };
        self.metrics.publish_failed();
        tracing::error!(event_id = %receipt.event_id, trace_id = %receipt.trace_id, %error, "Signing the decision failed; not publishing it (the event will be redelivered).");
        false
    }

    /// The routing plan of a decided event; the copies take the message's
    /// header map (what is left is enough to ack it).
    fn plan(
        &self,
        message: &mut jetstream::Message,
        read: &Read,
        receipt: &DecisionReceipt,
        route: Route,
    ) -> Plan {
        let ingress = Ingress {
            token: &read.token,
            seq: read.seq,
            headers: message.message.headers.take(),
            payload: message.payload.clone(),
        };
        plan::event(ingress, receipt, route).unwrap_or_else(|error| {
            // INVARIANT: a receipt is plain strings and numbers; it always serialises.
            self.metrics.publish_failed();
            tracing::error!(event_id = %receipt.event_id, %error, "The receipt does not serialise; not publishing it (the event will be redelivered).");
            Plan::retry()
        })
    }

    /// Stores the plan's messages (marking where the routed copies went,
    /// `watermarks`), then the pending approval of a parked event.
    async fn store(
        &self,
        messages: Vec<plan::Message>,
        pending: Option<Box<ApprovalState>>,
    ) -> Result<(), async_nats::Error> {
        let Some(state) = pending else {
            return publish::send(&self.js, messages, Some(&self.watermarks)).await;
        };
        publish::send(&self.js, messages, None).await?;
        Box::pin(self.guard.approvals.record(&state)).await
    }

    /// Acks the ingress message once its plan is stored; naks it (it comes
    /// again) when the plan failed (`Some(Err)`) or said to retry (`None`).
    async fn settle(
        &self,
        message: jetstream::Message,
        stored: Option<Result<(), async_nats::Error>>,
        published: telemetry::Published,
        receipt: &DecisionReceipt,
    ) {
        let (event_id, trace_id) = (&receipt.event_id, &receipt.trace_id);
        match stored {
            Some(Ok(())) => {
                self.metrics.published(published);
                if let Err(error) = message.ack().await {
                    tracing::warn!(%event_id, %trace_id, %error, "Ack failed; the event will be redelivered and deduplicated.");
                }
                tracing::debug!(%event_id, %trace_id, decision = %receipt.decision, "Event decided.");
                return;
            }
            Some(Err(error)) => {
                self.metrics.publish_failed();
                tracing::warn!(%event_id, %trace_id, %error, "Publishing the decision failed; the event will be redelivered.");
            }
            None => {}
        }
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
            .await;
    }
}

/// Erases the original of a redacted event from `MESH_INGRESS` (its
/// redacted copies are stored): `Err` leaves the event unacked, so it comes
/// again, is decided again (the copies collapse by their ids) and erased then.
async fn erase_original(
    js: &jetstream::Context,
    seq: u64,
    receipt: &DecisionReceipt,
) -> Result<(), async_nats::Error> {
    // A handle only: nothing is asked of the broker until the delete.
    let ingress = js.get_stream_no_info(subjects::STREAM_INGRESS).await?;
    match ingress.delete_message(seq).await {
        Ok(_) => {
            tracing::debug!(event_id = %receipt.event_id, seq, "Original of a redacted event erased from MESH_INGRESS.");
            Ok(())
        }
        // Erased already (a redelivery after the erase, before the ack).
        Err(e) if matches!(e.kind(), jetstream::stream::DeleteMessageErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The payload an `@redact` allow delivers, with the kinds replaced
/// recorded on the receipt; `None` when nothing matched (the original is
/// delivered). A payload that cannot be redacted denies the event (fail
/// closed).
fn redaction(
    event: &MeshEvent,
    payload: &bytes::Bytes,
    redact: &[String],
    receipt: &mut DecisionReceipt,
) -> Option<bytes::Bytes> {
    let structured = event.mode == schemas::ContentMode::Structured;
    match policy_engine::Detector::shared().redact_message(payload, structured, redact) {
        Ok(r) if r.kinds.is_empty() => None,
        Ok(r) => {
            receipt.redacted = r.kinds.iter().map(|k| (*k).to_owned()).collect();
            Some(r.payload.into())
        }
        Err(error) => {
            receipt.decision = Decision::Deny;
            receipt.errors.push(error.to_string());
            None
        }
    }
}

/// Why an ingress message is invalid, with what the audit sink salvages
/// from it (its id, type and trace).
struct Invalid {
    error: String,
    attrs: RawAttributes,
    trace: schemas::TraceParent,
    derived: bool,
}

impl Invalid {
    fn record(&self, receipt: &mut DecisionReceipt) {
        receipt.trace_id = self.trace.trace_id_hex();
        receipt.trace_derived = self.derived;
        receipt.event_id = self.attrs.id.clone();
        receipt.event_type = self.attrs.ty.clone();
        receipt.errors = vec![self.error.clone()];
    }
}

/// An ingress message as read: what the stages need of it.
struct Read {
    subject: String,
    /// The agent's subject token (`unknown` when the subject has none).
    token: String,
    seq: u64,
    event: Result<MeshEvent, Invalid>,
}

impl Read {
    fn of(message: &jetstream::Message, limits: schemas::Limits) -> Self {
        let subject = message.subject.as_str().to_owned();
        let seq = message
            .info()
            .map(|i| i.stream_sequence)
            .unwrap_or_default();
        let token = subjects::parse_ingress(&subject)
            .map_or("unknown", |p| p.agent)
            .to_owned();
        let headers = message.headers.as_ref();
        let event = MeshEvent::from_message(&subject, headers, &message.payload, limits).map_err(
            |invalid| {
                // The id and trace the audit sink records for this message too.
                let attrs = RawAttributes::read(headers, &message.payload);
                let (trace, derived) = attrs.trace(&subject);
                Invalid {
                    error: invalid.to_string(),
                    attrs,
                    trace,
                    derived,
                }
            },
        );
        Self {
            subject,
            token,
            seq,
            event,
        }
    }

    /// The event's `policy.decision` span, a child of the event's trace.
    fn span(&self) -> tracing::Span {
        let span = telemetry::spans::decision(&self.subject);
        match &self.event {
            Ok(event) => telemetry::spans::join_event(&span, event),
            Err(invalid) => telemetry::spans::join(&span, &invalid.trace, None),
        }
        span
    }

    /// The receipt before the decision: `invalid` until decided.
    fn receipt(&self, bundle: &PolicyBundle) -> DecisionReceipt {
        DecisionReceipt {
            decision: Decision::Invalid,
            policy_hash: bundle.hash().to_owned(),
            decision_id: uuid::Uuid::now_v7().to_string(),
            agent: self.token.clone(),
            ingress_subject: self.subject.clone(),
            ..Default::default()
        }
    }
}

/// Records the decided event's attributes on its receipt.
fn record_event(event: &MeshEvent, receipt: &mut DecisionReceipt) {
    receipt.event_id = event.id().to_owned();
    receipt.trace_id = event.trace.trace_id_hex();
    receipt.trace_derived = event.trace_derived;
    receipt.event_type = event.event_type.as_str().to_owned();
    receipt.target = event.target.as_ref().map(|t| t.to_string());
    receipt.subject = schemas::AttributesReader::subject(&event.event).map(str::to_owned);
    receipt.causation_id = event.causation_id.clone();
    receipt.causation_agent = event.causation_agent.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns.
    fn future_size<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every event spawns `Worker::handle`: its future is moved as a whole,
    /// so what only some events await is boxed (module docs). With it laid
    /// out inline the task was 7,488 bytes in a test build, boxed 4,480.
    #[test]
    fn the_per_event_task_stays_small() {
        let size = future_size(Worker::handle);
        assert!(
            size <= 5 * 1024,
            "Worker::handle's future is {size} bytes: box what only some events await"
        );
    }
}

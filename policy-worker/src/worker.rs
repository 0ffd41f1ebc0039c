//! The per-event path: decode and validate, decide, publish the receipt and
//! the routed or dead-lettered copy, then ack the ingress message.
//!
//! Throughput comes from batched pulls and many events in flight at once:
//! publishes are sent asynchronously and their JetStream acks awaited
//! together, so no event blocks on another's round trip. Each event is
//! decided on a task of its own on the multi-threaded runtime, so decoding,
//! Cedar and serialisation use every core; the consume loop only pulls and
//! bounds how many are in flight. The order of work within one event is
//! unchanged: the ingress message is acked only after its receipt and its
//! delivery or dead letter are stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderName;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, message::PublishMessage};
use futures::StreamExt;
use schemas::{Decision, DecisionReceipt, MeshEvent, RawAttributes, headers, subjects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::approval::forwardable_owned;
use crate::cache::{Lookup, ToolCache};
use crate::cards::Cards;
use crate::guard;
use crate::signing::Sealer;
use crate::{Config, Error};
use policy_engine::PolicyBundle;

// The names of the headers every copy gets, without parsing or allocating.
const DECISION_ID: HeaderName = HeaderName::from_static(headers::DECISION_ID);
const POLICY_HASH: HeaderName = HeaderName::from_static(headers::POLICY_HASH);
const TRACE_ID: HeaderName = HeaderName::from_static(headers::TRACE_ID);

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
            js,
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
                () = work => {}
                () = deadline => {
                    tracing::warn!(?grace, "In-flight events did not finish within the grace period; terminating now (they will be redelivered).");
                    break;
                }
            }
        }
    }

    /// Decides one ingress message and acks it once every publish is stored.
    async fn handle(self: Arc<Self>, mut message: jetstream::Message) {
        let started = Instant::now();
        let subject = message.subject.as_str().to_owned();
        self.metrics.received();
        // Joined to the event's trace below, once its traceparent is read.
        let span = telemetry::spans::decision(&subject);
        let seq = message
            .info()
            .map(|i| i.stream_sequence)
            .unwrap_or_default();
        let token = subjects::parse_ingress(&subject)
            .map_or("unknown", |p| p.agent)
            .to_owned();
        let bundle = self.policies.borrow().clone();
        let parsed = MeshEvent::from_message(
            &subject,
            message.headers.as_ref(),
            &message.payload,
            self.limits,
        );

        let mut receipt = DecisionReceipt {
            // Stays so when the event does not parse.
            decision: Decision::Invalid,
            policy_hash: bundle.hash().to_owned(),
            decision_id: uuid::Uuid::now_v7().to_string(),
            agent: token.clone(),
            ingress_subject: subject.clone(),
            ..Default::default()
        };
        let mut target = None;
        let mut park = false;
        match &parsed {
            Ok(event) => {
                let step = subjects::parse_ingress(&subject).map_or("", |p| p.step);
                telemetry::spans::join_event(&span, event);
                // A call whose arguments break its tool's input schema is
                // invalid and never reaches the guardrails or Cedar.
                let verdict = match self.cards.check(event).await {
                    Ok(()) => {
                        let verdict;
                        (verdict, park) =
                            self.guard.decide(&bundle, event, step, &mut receipt).await;
                        Some(verdict)
                    }
                    Err(violations) => {
                        receipt.reasons = vec![policy_engine::INPUT_SCHEMA.to_owned()];
                        receipt.errors = violations;
                        self.guard.mark_invalid(&mut receipt);
                        None
                    }
                };
                receipt.event_id = event.id().to_owned();
                receipt.trace_id = event.trace.trace_id_hex();
                receipt.trace_derived = event.trace_derived;
                receipt.event_type = event.event_type.as_str().to_owned();
                receipt.target = event.target.as_ref().map(|t| t.to_string());
                receipt.subject =
                    schemas::AttributesReader::subject(&event.event).map(str::to_owned);
                receipt.causation_id = event.causation_id.clone();
                receipt.causation_agent = event.causation_agent.clone();
                if let Some(verdict) = verdict {
                    receipt.decision = if verdict.allowed {
                        Decision::Allow
                    } else {
                        Decision::Deny
                    };
                    receipt.reasons = verdict.reasons;
                    receipt.errors = verdict.errors;
                    if verdict.allowed {
                        target = event.target.clone();
                    }
                }
            }
            Err(invalid) => {
                // The id and trace the audit sink records for this message too.
                let attrs = RawAttributes::read(message.headers.as_ref(), &message.payload);
                let (trace, derived) = attrs.trace(&subject);
                telemetry::spans::join(&span, &trace, None);
                receipt.trace_id = trace.trace_id_hex();
                receipt.trace_derived = derived;
                receipt.event_id = attrs.id;
                receipt.event_type = attrs.ty;
                receipt.errors = vec![invalid.to_string()];
                self.guard.mark_invalid(&mut receipt);
            }
        }
        let evaluation = started.elapsed();
        receipt.eval_micros = evaluation.as_micros() as u64;
        self.metrics.decided(receipt.decision, evaluation);
        telemetry::spans::record_decision(
            &span,
            &receipt.event_id,
            &receipt.trace_id,
            receipt.decision.as_str(),
            &receipt.policy_hash,
        );
        let published = match (receipt.decision, &target) {
            _ if park => telemetry::Published::Parked,
            (Decision::Allow, Some(_)) => telemetry::Published::Delivery,
            (Decision::Allow, None) => telemetry::Published::ReceiptOnly,
            (Decision::Deny | Decision::Invalid, _) => telemetry::Published::DeadLetter,
        };
        // The cache is asked only about what is allowed and routed now: a
        // denied call never touches it, a parked one is released later.
        let mut answer = None;
        if let (Ok(event), Decision::Allow, Some(_), false) =
            (&parsed, receipt.decision, &target, park)
        {
            let rules = bundle.cache();
            if !rules.is_empty() {
                match self.cache.lookup(rules, event).await {
                    Lookup::NotCacheable => {}
                    Lookup::Deliver(status) => receipt.cache = Some(status),
                    Lookup::Hit(hit) => {
                        receipt.cache = Some(schemas::CacheStatus::Hit);
                        receipt.cache_source = Some(hit.source().to_owned());
                        answer = Some(hit.message(event, &receipt));
                    }
                }
                if let Some(source) = self.cache.fill(rules, event).await {
                    receipt.cache = Some(schemas::CacheStatus::Stored);
                    receipt.cache_source = Some(source);
                }
            }
        }
        receipt.decided_at =
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        // Fail closed: a decision that cannot be signed is neither published
        // nor acked; JetStream redelivers the event.
        let mut sealed = self.sealer.seal(&mut receipt, &message.payload).await;
        if let (Ok(()), Some((_, h, payload))) = (&sealed, &mut answer) {
            sealed = self.sealer.seal_answer(&receipt, h, payload).await;
        }
        if let Err(error) = sealed {
            self.metrics.publish_failed();
            tracing::error!(event_id = %receipt.event_id, trace_id = %receipt.trace_id, %error, "Signing the decision failed; not publishing it (the event will be redelivered).");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                .await;
            return;
        }

        // An event is its agent and id: the same agent's repeated event
        // collapses to one receipt and one delivery via `Nats-Msg-Id`, and
        // another agent's event with the same id does not. Invalid events
        // may lack an id (or reuse one a later valid event needs), so theirs
        // is keyed by the ingress sequence.
        let dedup_id = match receipt.decision {
            Decision::Invalid => format!("invalid-{seq}"),
            _ => subjects::event_key(&token, &receipt.event_id),
        };
        // An event waiting for a human gets its receipt once answered.
        let done = if park {
            self.guard
                .approvals
                .park(
                    &message,
                    &token,
                    &receipt,
                    telemetry::spans::traceparent(&span),
                )
                .instrument(telemetry::spans::delivery(&span))
                .await
        } else {
            self.publish(
                &mut message,
                &token,
                &receipt,
                &dedup_id,
                target.as_ref(),
                answer,
            )
            .instrument(telemetry::spans::delivery(&span))
            .await
        };
        match done {
            Ok(()) => {
                self.metrics.published(published);
                if let Err(error) = message.ack().await {
                    tracing::warn!(event_id = %receipt.event_id, trace_id = %receipt.trace_id, %error, "Ack failed; the event will be redelivered and deduplicated.");
                }
                tracing::debug!(event_id = %receipt.event_id, trace_id = %receipt.trace_id, decision = %receipt.decision, "Event decided.");
            }
            Err(error) => {
                self.metrics.publish_failed();
                tracing::warn!(event_id = %receipt.event_id, trace_id = %receipt.trace_id, %error, "Publishing the decision failed; the event will be redelivered.");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await;
            }
        }
    }

    /// Publishes the receipt and the delivery or dead letter, and waits until
    /// JetStream has stored both. A call answered from the cache gets the
    /// cached answer (`cached`, to the caller) instead of its delivery.
    /// The copy takes the message's header map (what is left is enough to
    /// ack it).
    async fn publish(
        &self,
        message: &mut jetstream::Message,
        token: &str,
        receipt: &DecisionReceipt,
        dedup_id: &str,
        target: Option<&schemas::AgentId>,
        cached: Option<(String, async_nats::HeaderMap, bytes::Bytes)>,
    ) -> Result<(), async_nats::Error> {
        // INVARIANT: a receipt is plain strings and numbers; it always serialises.
        // A signed receipt is 1–2 KiB: one allocation, not a doubling series.
        let mut body = Vec::with_capacity(2048);
        serde_json::to_writer(&mut body, receipt)?;
        let receipt_ack = self
            .js
            .send_publish(
                subjects::decision(token),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(dedup_id),
            )
            .await?;

        // An approved tool call is also stored on `mesh.call.<target>.<source>`;
        // its delivery names that subject, so an agent reading its calls
        // there skips the delivery, and an older one answers the delivery.
        // A call answered from the cache reaches the tool's agent neither way.
        let call = match (receipt.decision, target) {
            (Decision::Allow, Some(target))
                if self.calls
                    && cached.is_none()
                    && receipt.event_type == schemas::EventType::ToolCall.as_str() =>
            {
                Some(subjects::call(target.as_str(), token))
            }
            _ => None,
        };
        // The event's headers minus JetStream's `Nats-*` and whatever the
        // agent sent as `Mesh-*`, plus the decision's: built once for the
        // copy (the call gets a clone), on the event's own map when nothing
        // in it has to go.
        let forward = match (receipt.decision, target) {
            (Decision::Allow, None) => None,
            (Decision::Allow, Some(_)) if cached.is_some() => None,
            _ => {
                let mut forward = forwardable_owned(message.message.headers.take());
                forward.insert(DECISION_ID, receipt.decision_id.as_str());
                forward.insert(POLICY_HASH, receipt.policy_hash.as_str());
                forward.insert(TRACE_ID, receipt.trace_id.as_str());
                Sealer::stamp(receipt, &mut forward);
                Some(forward)
            }
        };
        let call_ack = match (&call, &forward) {
            (Some(subject), Some(forward)) => Some(
                self.js
                    .send_publish(
                        subject.clone(),
                        PublishMessage::build()
                            .headers(forward.clone())
                            .payload(message.payload.clone())
                            .message_id(dedup_id),
                    )
                    .await?,
            ),
            _ => None,
        };
        let copy = match (receipt.decision, target, forward) {
            (Decision::Allow, Some(target), Some(mut forward)) => {
                if let Some(subject) = &call {
                    forward.insert(headers::CALL, subject.as_str());
                }
                Some((
                    subjects::deliver(target.as_str(), token),
                    forward,
                    message.payload.clone(),
                ))
            }
            (Decision::Deny | Decision::Invalid, _, Some(mut forward)) => {
                let reason = receipt.errors.first().cloned().unwrap_or_else(|| {
                    if receipt.reasons.is_empty() {
                        "no policy permits this event".to_owned()
                    } else {
                        format!("forbidden by {}", receipt.reasons.join(", "))
                    }
                });
                forward.insert(headers::REASON, schemas::percent_encode_header(&reason));
                if !receipt.reasons.is_empty() {
                    forward.insert(headers::POLICIES, receipt.reasons.join(","));
                }
                forward.insert(headers::INGRESS_SUBJECT, message.subject.as_str());
                Some((subjects::dead(token), forward, message.payload.clone()))
            }
            _ => None,
        };
        // The cached answer takes the delivery's place and its `Nats-Msg-Id`:
        // a redelivered call gets one answer, from the tool or the cache.
        let copy = cached.or(copy);
        let copy_ack = match copy {
            Some((subject, forward, payload)) => Some(
                self.js
                    .send_publish(
                        subject,
                        PublishMessage::build()
                            .headers(forward)
                            .payload(payload)
                            .message_id(dedup_id),
                    )
                    .await?,
            ),
            None => None,
        };
        receipt_ack.await?;
        if let Some(ack) = call_ack {
            ack.await?;
        }
        if let Some(ack) = copy_ack {
            ack.await?;
        }
        Ok(())
    }
}

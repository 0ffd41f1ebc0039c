//! Human approval: an event allowed by a permit annotated
//! `@approval("required")` is parked instead of delivered, and gets its one
//! receipt only once a human answered or the request expired.
//!
//! Parking stores the event byte for byte on
//! `mesh.approval.request.<source>.<approval id>` (stream `MESH_APPROVALS`)
//! and its state — the tentative receipt, when it expires — under the
//! approval id in the KV bucket `mesh-approvals`. Answers
//! (`meshctl approvals approve|reject`, or the worker itself when a request
//! expires) are JSON messages on `mesh.approval.answer.<source>.<approval
//! id>`; the worker consumes them through one durable consumer shared by
//! its replicas, moves the state from `pending` to the outcome with a
//! compare-and-set (the first answer wins, later ones are ignored), and then
//! publishes the final receipt — `allow` with the approver, or `deny` — and
//! the delivery or the dead letter. Publishing again after a crash is
//! harmless: every publish carries the event id as `Nats-Msg-Id`.
//!
//! An answer that arrives after the request's deadline expires it, whatever
//! it asked for. The decision released is the one made when the event
//! arrived; policies are not evaluated again.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, kv};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use schemas::approval::{Answer, AnswerAction, ApprovalState};
use schemas::{ApprovalStatus, Decision, subjects};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::plan::{self, Parking};
use crate::publish;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parks events and applies answers.
pub(crate) struct Approvals {
    js: jetstream::Context,
    kv: kv::Store,
    timeout: Duration,
    metrics: telemetry::WorkerMetrics,
    sealer: crate::signing::Sealer,
}

impl Approvals {
    pub(crate) fn new(
        js: jetstream::Context,
        kv: kv::Store,
        timeout: Duration,
        metrics: telemetry::WorkerMetrics,
        sealer: crate::signing::Sealer,
    ) -> Self {
        Self {
            js,
            kv,
            timeout,
            metrics,
            sealer,
        }
    }

    /// When an event parked `now` expires (its plan stores the request).
    pub(crate) fn parking(&self, now: DateTime<Utc>) -> Parking {
        Parking {
            now,
            expires: now + chrono::Duration::from_std(self.timeout).unwrap_or_default(),
            decision_span: None,
        }
    }

    /// Creates the pending state of a parked event once its request is
    /// stored; the ingress message may be acked once this returns `Ok`.
    pub(crate) async fn record(&self, state: &ApprovalState) -> Result<(), async_nats::Error> {
        let receipt = &state.receipt;
        match self
            .kv
            .create(&state.id, serde_json::to_vec(state)?.into())
            .await
        {
            Ok(_) => {
                tracing::info!(approval_id = %state.id, event_id = %receipt.event_id, policies = ?receipt.reasons, expires_at = %state.expires_at, "Event parked for approval.");
                Ok(())
            }
            // A redelivered event: its request is already there (pending or answered).
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies one answer message. `Ok` means ack it.
    async fn apply(&self, message: &jetstream::Message) -> Result<(), async_nats::Error> {
        let id = message
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let answer: Answer = match serde_json::from_slice(&message.payload) {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "Not an approval answer; dropped.");
                return Ok(());
            }
        };
        if answer.id != id {
            tracing::warn!(subject = %message.subject, answer_id = %answer.id, "Answer names another approval than its subject; dropped.");
            return Ok(());
        }
        loop {
            let entry = self.kv.entry(&id).await?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                tracing::warn!(approval_id = %id, "Answer to an unknown approval; dropped.");
                return Ok(());
            };
            let state: ApprovalState = match serde_json::from_slice(&entry.value) {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(approval_id = %id, %error, "Approval state unreadable; answer dropped.");
                    return Ok(());
                }
            };
            let next = state.answered(&answer, Utc::now());
            if state.status == ApprovalStatus::Pending {
                match self
                    .kv
                    .update(&id, serde_json::to_vec(&next)?.into(), entry.revision)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(approval_id = %id, status = %next.status, approver = %next.approver, event_id = %next.receipt.event_id, "Approval answered.");
                        return self.release(&next).await;
                    }
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(e.into()),
                }
            } else if state.status == next.status {
                // The same outcome again (a redelivered answer): publish again,
                // deduplicated by the event id.
                return self.release(&state).await;
            } else {
                tracing::info!(approval_id = %id, status = %state.status, action = answer.action.as_str(), "Approval already settled; answer ignored.");
                return Ok(());
            }
        }
    }

    /// Publishes the final receipt and the delivery or dead letter of an
    /// answered request, in a `policy.approval` span of the event's trace.
    async fn release(&self, state: &ApprovalState) -> Result<(), async_nats::Error> {
        let decision_span = state.decision_span.parse().ok();
        let span = telemetry::spans::approval(
            decision_span.as_ref(),
            &state.id,
            state.status.as_str(),
            &state.receipt.event_id,
            &state.receipt.trace_id,
        );
        self.publish_outcome(state).instrument(span).await
    }

    async fn publish_outcome(&self, state: &ApprovalState) -> Result<(), async_nats::Error> {
        let request = self
            .js
            .get_stream(subjects::STREAM_APPROVALS)
            .await?
            .get_last_raw_message_by_subject(&state.request_subject)
            .await;
        let mut receipt = state.final_receipt();
        let request = match request {
            Ok(r) => Some(r),
            Err(error) => {
                // Without the event there is nothing to deliver: deny.
                tracing::error!(approval_id = %state.id, %error, "Parked event no longer stored; the decision is deny.");
                receipt.decision = Decision::Deny;
                receipt.errors.push(format!(
                    "the parked event is no longer in `{}`: {error}",
                    subjects::STREAM_APPROVALS
                ));
                None
            }
        };
        // Signed as released: the outcome and its time are new.
        self.sealer.seal_digest(&mut receipt).await?;
        let request = request.as_ref().map(|r| (&r.headers, r.payload.clone()));
        let plan = plan::released(state, &receipt, request)?;
        publish::send(&self.js, plan.messages, None).await?;
        self.metrics.published(plan.published);
        Ok(())
    }
}

/// Starts the answer consumer and the expiry watch; both stop with `shutdown`.
pub(crate) async fn spawn(
    approvals: std::sync::Arc<Approvals>,
    consumer_name: String,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let stream = approvals.js.get_stream(subjects::STREAM_APPROVALS).await?;
    // Under broker authorization the operator provisions this durable with
    // the same settings; the worker's create is then a no-op update.
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &consumer_name,
            broker_config::approvals_consumer_config(&consumer_name),
        )
        .await?;
    tokio::spawn(answers(approvals.clone(), consumer, shutdown.clone()));
    tokio::spawn(expiries(approvals, shutdown));
    Ok(())
}

/// Applies answers one at a time, acking each once its outcome is published.
async fn answers(
    approvals: std::sync::Arc<Approvals>,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let mut messages = match consumer.messages().await {
            Ok(m) => {
                backoff = Duration::from_millis(100);
                Box::pin(m.take_until(shutdown.clone().cancelled_owned()))
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "Cannot pull approval answers; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let Ok(message) = message else { continue };
            match approvals.apply(&message).await {
                Ok(()) => {
                    if let Err(error) = message.ack().await {
                        tracing::warn!(%error, "Ack of an approval answer failed; it will be applied again.");
                    }
                }
                Err(error) => {
                    tracing::warn!(subject = %message.subject, %error, "Applying an approval answer failed; retrying.");
                    let _ = message
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                }
            }
        }
    }
}

/// Tails `mesh-approvals` and sends an `expire` answer for every pending
/// request past its deadline. Every replica does; the answers deduplicate
/// and only the first one settles the request.
///
/// The bucket is read by sequence with direct gets (no consumer: under
/// broker authorization the worker creates none but its own durables).
async fn expiries(approvals: std::sync::Arc<Approvals>, shutdown: CancellationToken) {
    let stream_name = format!("KV_{}", subjects::BUCKET_APPROVALS);
    let mut pending: HashMap<String, ApprovalState> = HashMap::new();
    let mut next: u64 = 1;
    let mut stream = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if stream.is_none() {
            match approvals.js.get_stream_no_info(&stream_name).await {
                Ok(s) => stream = Some(s),
                Err(error) => {
                    tracing::warn!(%error, "Cannot read approval requests; retrying.");
                    continue;
                }
            }
        }
        let Some(s) = &stream else { continue };
        read_requests(s, &mut next, &mut pending).await;
        send_expiries(&approvals, &mut pending).await;
    }
}

/// Reads every write to `mesh-approvals` from sequence `next` on, in order
/// (the last write of a key wins), into the `pending` requests.
async fn read_requests(
    s: &jetstream::stream::Stream<()>,
    next: &mut u64,
    pending: &mut HashMap<String, ApprovalState>,
) {
    let prefix = format!("$KV.{}.", subjects::BUCKET_APPROVALS);
    let filter = format!("{prefix}>");
    loop {
        match s
            .direct_get_next_for_subject(filter.as_str(), Some(*next))
            .await
        {
            Ok(message) => {
                *next = message.sequence + 1;
                let key = message
                    .subject
                    .strip_prefix(prefix.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let removed = message
                    .headers
                    .get("KV-Operation")
                    .is_some_and(|op| op.as_str() != "PUT");
                let state = (!removed)
                    .then(|| serde_json::from_slice::<ApprovalState>(&message.payload).ok())
                    .flatten()
                    .filter(|s| s.status == ApprovalStatus::Pending);
                match state {
                    Some(state) => {
                        pending.insert(key, state);
                    }
                    None => {
                        pending.remove(&key);
                    }
                }
            }
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
            Err(error) => {
                tracing::warn!(%error, "Reading approval requests failed; retrying.");
                break;
            }
        }
    }
}

/// Sends an `expire` answer for every pending request past its deadline.
async fn send_expiries(approvals: &Approvals, pending: &mut HashMap<String, ApprovalState>) {
    let now = Utc::now();
    let due: Vec<ApprovalState> = pending
        .values()
        .filter(|s| s.expires().is_none_or(|t| t <= now))
        .cloned()
        .collect();
    for state in due {
        let answer = Answer {
            id: state.id.clone(),
            action: AnswerAction::Expire,
            approver: String::new(),
            comment: format!("no answer by {}", state.expires_at),
            at: rfc3339(now),
        };
        match broker_config::admin::send_answer(&approvals.js, &state.agent, &answer).await {
            Ok(()) => {
                pending.remove(&state.id);
            }
            Err(error) => {
                tracing::warn!(approval_id = %state.id, %error, "Cannot send the expiry; retrying.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use schemas::approval::approval_id;

    #[test]
    fn ids_are_stable_tokens() {
        let id = approval_id("planner", "0192-abc.def *>");
        assert_eq!(id, approval_id("planner", "0192-abc.def *>"));
        assert_ne!(id, approval_id("coder", "0192-abc.def *>"));
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, approval_id("planner", "other"));
    }
}

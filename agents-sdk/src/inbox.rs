//! The agent's inbox for calls in flight: a subscription on its receipts
//! (`mesh.decision.<self>`, from connect on) and, from the first call on,
//! one on its deliveries (`mesh.deliver.<self>.>`), each read by one task
//! that hands every receipt and every answer to the call waiting for it, by
//! event id. Recent receipts are kept, so a wait that starts after its
//! receipt arrived still finds it.
//!
//! Plain subscriptions, not JetStream consumers: on a mesh with
//! authorization an agent may subscribe to its own subjects but may not
//! create consumers (see `docs/security.md`). A subscription made before a
//! call is published sees everything the call can get back; the agent's
//! durable consumer is not touched: it still gets (and the delivery stream
//! drops) the answers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use schemas::{DecisionReceipt, subjects};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::delivery::Received;
use crate::error::BoxError;

/// What the inbox hands to a waiting call.
#[derive(Debug)]
pub(crate) enum Arrival {
    /// The receipt of the call's event.
    Decision(Box<DecisionReceipt>),
    /// A delivery whose `causationid` is the call's id.
    Answer(Box<Received>),
}

type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Arrival>>>>;

/// How many receipts the inbox keeps for waits that start late.
const RECENT_RECEIPTS: usize = 4096;

/// The receipts that arrived most recently, by event id.
#[derive(Debug, Default)]
struct Recent {
    receipts: HashMap<String, DecisionReceipt>,
    order: VecDeque<String>,
}

impl Recent {
    fn insert(&mut self, receipt: DecisionReceipt) {
        let id = receipt.event_id.clone();
        if self.receipts.insert(id.clone(), receipt).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > RECENT_RECEIPTS {
            if let Some(old) = self.order.pop_front() {
                self.receipts.remove(&old);
            }
        }
    }
}

/// The running inbox of one agent.
#[derive(Default)]
pub(crate) struct Inbox {
    waiters: Waiters,
    recent: Arc<Mutex<Recent>>,
    /// The receipt reader, started when the agent connects.
    receipts: Mutex<Option<CancellationToken>>,
    /// The answer reader; restarted by the next call if it ended.
    answers: tokio::sync::Mutex<Option<CancellationToken>>,
}

impl Inbox {
    /// Stops the reading tasks (the agent is going away).
    pub(crate) fn stop(&self) {
        if let Ok(receipts) = self.receipts.lock()
            && let Some(token) = receipts.as_ref()
        {
            token.cancel();
        }
        if let Ok(answers) = self.answers.try_lock()
            && let Some(token) = answers.as_ref()
        {
            token.cancel();
        }
    }
}

/// A registered wait; unregisters itself when dropped.
pub(crate) struct Waiting {
    id: String,
    waiters: Waiters,
    pub(crate) arrivals: mpsc::UnboundedReceiver<Arrival>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.remove(&self.id);
        }
    }
}

fn hand_over(waiters: &Waiters, id: &str, arrival: Arrival) {
    if let Ok(waiters) = waiters.lock()
        && let Some(tx) = waiters.get(id)
    {
        let _ = tx.send(arrival);
    }
}

impl Agent {
    /// Subscribes to the agent's receipts; called once, at connect, so
    /// every receipt of an event this agent publishes is seen.
    pub(crate) async fn start_receipts(&self) -> Result<(), BoxError> {
        let mut receipts = self
            .inner
            .client
            .subscribe(subjects::decision(self.id().as_str()))
            .await?;
        let token = CancellationToken::new();
        let stop = token.clone();
        let waiters = self.inner.inbox.waiters.clone();
        let recent = self.inner.inbox.recent.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    next = receipts.next() => match next {
                        Some(message) => match serde_json::from_slice::<DecisionReceipt>(&message.payload) {
                            Ok(receipt) => {
                                if let Ok(mut recent) = recent.lock() {
                                    recent.insert(receipt.clone());
                                }
                                let id = receipt.event_id.clone();
                                hand_over(&waiters, &id, Arrival::Decision(Box::new(receipt)));
                            }
                            Err(e) => tracing::warn!(subject = %message.subject, error = %e, "Ignoring a decision receipt that does not parse."),
                        },
                        None => break,
                    },
                }
            }
        });
        if let Ok(mut running) = self.inner.inbox.receipts.lock() {
            *running = Some(token);
        }
        Ok(())
    }

    /// Registers a wait for event `id`'s receipt (and, with `answers`, for
    /// deliveries that answer it, starting that subscription first if it
    /// is not running). A receipt that already came is handed over at once.
    pub(crate) async fn wait_for(&self, id: &str, answers: bool) -> Result<Waiting, BoxError> {
        let inbox = &self.inner.inbox;
        if answers {
            let mut running = inbox.answers.lock().await;
            if running.as_ref().is_none_or(CancellationToken::is_cancelled) {
                *running = Some(self.start_answers().await?);
            }
        }
        let (tx, arrivals) = mpsc::unbounded_channel();
        if let Ok(mut waiters) = inbox.waiters.lock() {
            waiters.insert(id.to_owned(), tx);
        }
        // A receipt that came before the registration (one that comes now
        // may be handed over twice; waits take the first).
        let earlier = inbox
            .recent
            .lock()
            .ok()
            .and_then(|recent| recent.receipts.get(id).cloned());
        if let Some(receipt) = earlier {
            hand_over(&inbox.waiters, id, Arrival::Decision(Box::new(receipt)));
        }
        Ok(Waiting {
            id: id.to_owned(),
            waiters: inbox.waiters.clone(),
            arrivals,
        })
    }

    async fn start_answers(&self) -> Result<CancellationToken, BoxError> {
        let me = self.id().to_string();
        let mut answers = self
            .inner
            .client
            .subscribe(schemas::subjects::deliveries_to(&me))
            .await?;
        // The subscription is in place on the server before the call is
        // published (same connection, in order).
        let token = CancellationToken::new();
        let stop = token.clone();
        let waiters = self.inner.inbox.waiters.clone();
        let trust = self.inner.trust.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    next = answers.next() => match next {
                        Some(message) => match Received::from_delivery(&message.subject, message.headers.as_ref(), &message.payload) {
                            // The same message reaches the durable too, where
                            // a refusal is logged and counted; here it is
                            // only kept from the waiting call.
                            Ok(answer) if !verified(trust.as_deref(), &answer, &message).await => {
                                tracing::debug!(subject = %message.subject, "Ignoring an answer whose decision signature does not verify.");
                            }
                            Ok(answer) => {
                                if let Some(causation) = answer.causation_id().map(str::to_owned) {
                                    hand_over(&waiters, &causation, Arrival::Answer(Box::new(answer)));
                                }
                            }
                            Err(e) => tracing::debug!(subject = %message.subject, error = %e, "Ignoring a delivery that is not a valid mesh event."),
                        },
                        None => break,
                    },
                }
            }
            // Ended: the next call starts a new subscription.
            stop.cancel();
        });
        Ok(token)
    }
}

/// Whether an answer's decision signature verifies (always, without `trust`).
async fn verified(
    trust: Option<&crate::trust::Trust>,
    answer: &Received,
    message: &async_nats::Message,
) -> bool {
    match trust {
        Some(trust) => trust
            .verify(
                answer.mesh_event(),
                message.headers.as_ref(),
                &message.payload,
            )
            .await
            .is_ok(),
        None => true,
    }
}

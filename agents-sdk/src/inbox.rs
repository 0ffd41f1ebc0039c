//! The agent's inbox for calls in flight: one ordered consumer on its
//! receipts (`mesh.decision.<self>`) and one on its deliveries
//! (`mesh.deliver.<self>.>`), read by one task that hands each receipt and
//! each answer to the call waiting for it, by event id.
//!
//! Started on the first call, before that call is published, so no receipt
//! or answer can slip past; shared by every later call, so a call costs no
//! consumer of its own. The agent's durable consumer is not touched: it
//! still gets (and the delivery stream drops) the answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer::DeliverPolicy;
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

/// The running inbox of one agent.
#[derive(Default)]
pub(crate) struct Inbox {
    waiters: Waiters,
    /// Whether the reading task runs; restarted by the next call if not.
    running: tokio::sync::Mutex<Option<CancellationToken>>,
}

impl Inbox {
    /// Stops the reading task (the agent is going away).
    pub(crate) fn stop(&self) {
        if let Ok(running) = self.running.try_lock()
            && let Some(token) = running.as_ref()
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

impl Agent {
    /// Registers a wait for event `id`'s receipt and answers, starting the
    /// inbox first if it is not running.
    pub(crate) async fn wait_for(&self, id: &str) -> Result<Waiting, BoxError> {
        let inbox = &self.inner.inbox;
        {
            let mut running = inbox.running.lock().await;
            if running.as_ref().is_none_or(CancellationToken::is_cancelled) {
                *running = Some(self.start_inbox().await?);
            }
        }
        let (tx, arrivals) = mpsc::unbounded_channel();
        if let Ok(mut waiters) = inbox.waiters.lock() {
            waiters.insert(id.to_owned(), tx);
        }
        Ok(Waiting {
            id: id.to_owned(),
            waiters: inbox.waiters.clone(),
            arrivals,
        })
    }

    async fn start_inbox(&self) -> Result<CancellationToken, BoxError> {
        let me = self.id().to_string();
        let mut receipts = self
            .ordered(
                subjects::STREAM_DECISION,
                subjects::decision(&me),
                DeliverPolicy::New,
            )
            .await?;
        let mut answers = self
            .ordered(
                subjects::STREAM_DELIVER,
                format!("mesh.deliver.{me}.>"),
                DeliverPolicy::New,
            )
            .await?;
        let token = CancellationToken::new();
        let stop = token.clone();
        let waiters = self.inner.inbox.waiters.clone();
        let deliver = move |id: &str, arrival: Arrival| {
            if let Ok(waiters) = waiters.lock()
                && let Some(tx) = waiters.get(id)
            {
                let _ = tx.send(arrival);
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    next = receipts.next() => match next {
                        Some(Ok(message)) => match serde_json::from_slice::<DecisionReceipt>(&message.payload) {
                            Ok(receipt) => {
                                let id = receipt.event_id.clone();
                                deliver(&id, Arrival::Decision(Box::new(receipt)));
                            }
                            Err(e) => tracing::warn!(subject = %message.subject, error = %e, "Ignoring a decision receipt that does not parse."),
                        },
                        Some(Err(e)) => tracing::debug!(error = %e, "Receipt consumer hiccup; it resumes by itself."),
                        None => break,
                    },
                    next = answers.next() => match next {
                        Some(Ok(message)) => match Received::from_delivery(&message.subject, message.headers.as_ref(), &message.payload) {
                            Ok(answer) => {
                                if let Some(causation) = answer.causation_id().map(str::to_owned) {
                                    deliver(&causation, Arrival::Answer(Box::new(answer)));
                                }
                            }
                            Err(e) => tracing::debug!(subject = %message.subject, error = %e, "Ignoring a delivery that is not a valid mesh event."),
                        },
                        Some(Err(e)) => tracing::debug!(error = %e, "Answer consumer hiccup; it resumes by itself."),
                        None => break,
                    },
                }
            }
            // Ended: the next call starts a new inbox.
            stop.cancel();
        });
        Ok(token)
    }
}

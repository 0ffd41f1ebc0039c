//! The agent's inbox for calls in flight: its receipts (from connect on)
//! and, from the first call on, a subscription on its deliveries
//! (`mesh.deliver.<self>.>`), each read by a task that hands every receipt
//! and every answer to the call waiting for it, by event id. Recent
//! receipts are kept, so a wait that starts after its receipt arrived still
//! finds it.
//!
//! Receipts are read from the stream, through the agent's durable
//! `receipts-<id>` on `MESH_DECISION` (the one create an agent's key may
//! send, as the Python SDK does), and acknowledged: a receipt written while
//! the agent was disconnected is read when it is back. While connected the
//! agent also listens on `mesh.decision.<self>`: replicas of one agent
//! share its durable, where each receipt reaches one of them, and each
//! must see the receipts of its own events. A wait takes the first copy.
//!
//! Answers come on a plain subscription: one made before a call is
//! published sees everything the call can get back; the agent's durable
//! consumer is not touched: it still gets (and the delivery stream drops)
//! the answers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use schemas::{AgentId, DecisionReceipt, subjects};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::BoxError;
use crate::received::Received;
use crate::trust::Trust;

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

impl Inbox {
    /// Starts reading the receipts of agent `id`, from its durable and from
    /// its receipts subject; called once, at connect, so every receipt of an
    /// event the agent publishes is seen.
    pub(crate) async fn start_receipts(
        &self,
        id: &AgentId,
        js: &jetstream::Context,
        client: &Client,
    ) -> Result<(), BoxError> {
        let me = id.as_str();
        let durable = subjects::receipts_consumer(me);
        let consumer: PullConsumer = js
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some(durable.clone()),
                    description: Some(format!("decision receipts of agent `{me}`")),
                    filter_subject: subjects::decision(me),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: RECEIPTS_ACK_WAIT,
                    max_deliver: -1,
                    max_ack_pending: 1000,
                    ..Default::default()
                },
                subjects::STREAM_DECISION,
            )
            .await?;
        let live = client.subscribe(subjects::decision(me)).await?;
        let token = CancellationToken::new();
        let inbox = Arrivals {
            waiters: self.waiters.clone(),
            recent: self.recent.clone(),
        };
        tokio::spawn(read_durable(
            consumer,
            durable,
            inbox.clone(),
            token.clone(),
        ));
        tokio::spawn(read_live(live, inbox, token.clone()));
        if let Ok(mut running) = self.receipts.lock() {
            *running = Some(token);
        }
        Ok(())
    }

    /// Registers a wait for event `id`'s receipt (and, with `answers`, for
    /// deliveries to agent `me` that answer it, starting that subscription
    /// on `client` first if it is not running; with `trust`, only answers
    /// whose decision signature verifies). A receipt that already came is
    /// handed over at once.
    pub(crate) async fn wait_for(
        &self,
        client: &Client,
        me: &AgentId,
        trust: Option<Arc<Trust>>,
        id: &str,
        answers: bool,
    ) -> Result<Waiting, BoxError> {
        if answers {
            let mut running = self.answers.lock().await;
            if running.as_ref().is_none_or(CancellationToken::is_cancelled) {
                *running = Some(self.start_answers(client, me, trust).await?);
            }
        }
        let (tx, arrivals) = mpsc::unbounded_channel();
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.insert(id.to_owned(), tx);
        }
        // A receipt that came before the registration (one that comes now
        // may be handed over twice; waits take the first).
        let earlier = self
            .recent
            .lock()
            .ok()
            .and_then(|recent| recent.receipts.get(id).cloned());
        if let Some(receipt) = earlier {
            hand_over(&self.waiters, id, Arrival::Decision(Box::new(receipt)));
        }
        Ok(Waiting {
            id: id.to_owned(),
            waiters: self.waiters.clone(),
            arrivals,
        })
    }

    async fn start_answers(
        &self,
        client: &Client,
        me: &AgentId,
        trust: Option<Arc<Trust>>,
    ) -> Result<CancellationToken, BoxError> {
        let mut answers = client
            .subscribe(schemas::subjects::deliveries_to(me.as_str()))
            .await?;
        // The subscription is in place on the server before the call is
        // published (same connection, in order).
        let token = CancellationToken::new();
        let stop = token.clone();
        let waiters = self.waiters.clone();
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

/// The ack wait of the receipts durable, as `meshctl up` provisions it.
const RECEIPTS_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long one pull of receipts waits at the server.
const RECEIPTS_PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long the reader waits after a failed pull.
const RECEIPTS_PULL_RETRY: Duration = Duration::from_secs(1);

/// Where arriving receipts go: the waits, and the recent ones.
#[derive(Clone)]
struct Arrivals {
    waiters: Waiters,
    recent: Arc<Mutex<Recent>>,
}

impl Arrivals {
    /// Hands `payload` over as a receipt; false when it does not parse.
    fn receipt(&self, subject: &str, payload: &[u8]) -> bool {
        match serde_json::from_slice::<DecisionReceipt>(payload) {
            Ok(receipt) => {
                if let Ok(mut recent) = self.recent.lock() {
                    recent.insert(receipt.clone());
                }
                let id = receipt.event_id.clone();
                hand_over(&self.waiters, &id, Arrival::Decision(Box::new(receipt)));
                true
            }
            Err(e) => {
                tracing::warn!(%subject, error = %e, "Ignoring a decision receipt that does not parse.");
                false
            }
        }
    }
}

/// Pulls the agent's durable of receipts until `stop`, acknowledging each
/// receipt once handed over (one that does not parse is terminated).
async fn read_durable(
    consumer: PullConsumer,
    name: String,
    inbox: Arrivals,
    stop: CancellationToken,
) {
    'pulling: loop {
        let pulled = tokio::select! {
            () = stop.cancelled() => break 'pulling,
            pulled = consumer.batch().max_messages(64).expires(RECEIPTS_PULL_EXPIRES).messages() => pulled,
        };
        let failure = match pulled {
            Ok(mut batch) => loop {
                tokio::select! {
                    () = stop.cancelled() => break 'pulling,
                    next = batch.next() => match next {
                        Some(Ok(message)) => {
                            let kind = if inbox.receipt(&message.subject, &message.payload) {
                                AckKind::Ack
                            } else {
                                AckKind::Term
                            };
                            if let Err(e) = message.ack_with(kind).await {
                                tracing::debug!(consumer = %name, error = %e, "Could not acknowledge a receipt.");
                            }
                        }
                        // Delivered in full, or expired: pull again.
                        None => break None,
                        Some(Err(e)) => break Some(e.to_string()),
                    },
                }
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = failure {
            tracing::debug!(consumer = %name, %error, "Pulling receipts failed; pulling again.");
            tokio::select! {
                () = stop.cancelled() => break 'pulling,
                () = tokio::time::sleep(RECEIPTS_PULL_RETRY) => {}
            }
        }
    }
}

/// Reads the receipts subject while connected, until `stop`.
async fn read_live(mut live: async_nats::Subscriber, inbox: Arrivals, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            next = live.next() => match next {
                Some(message) => {
                    inbox.receipt(&message.subject, &message.payload);
                }
                None => break,
            },
        }
    }
}

/// Whether an answer's decision signature verifies (always, without `trust`).
async fn verified(trust: Option<&Trust>, answer: &Received, message: &async_nats::Message) -> bool {
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

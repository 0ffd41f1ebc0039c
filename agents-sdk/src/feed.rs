//! A pull consumer read ahead: one task per consumer pulls batches into a
//! local buffer of at most `capacity` messages, and the reader takes them
//! one by one without a round trip each.
//!
//! Nothing buffered sits out its ack wait: the pulling task tells JetStream
//! that every message held longer than a third of the ack wait is in
//! progress, so a backlog is never delivered twice because it was fetched
//! early. When the feed is dropped, what is still buffered is refused at
//! once (delivered again to the next reader, not after the ack wait).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{DeliveryError, DeliveryErrorKind};

/// How long one pull waits at the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// How long the feed waits after a failed pull.
const PULL_RETRY: Duration = Duration::from_secs(1);

/// What the pulling task and the reader share.
struct Shared {
    buffer: Mutex<VecDeque<(jetstream::Message, Instant)>>,
    /// The last pull error, for the reader to report once.
    error: Mutex<Option<DeliveryError>>,
    /// Messages (or an error) arrived.
    arrived: Notify,
    /// The reader took the buffer down to half: time for a pull.
    taken: Notify,
    /// At most this many messages are buffered.
    capacity: usize,
    /// Buffered messages, for the agent's metrics.
    depth: Arc<AtomicUsize>,
}

impl Shared {
    fn len(&self) -> usize {
        self.buffer.lock().map(|b| b.len()).unwrap_or(0)
    }

    fn push(&self, message: jetstream::Message) {
        if let Ok(mut buffer) = self.buffer.lock() {
            buffer.push_back((message, Instant::now()));
            self.depth.store(buffer.len(), Ordering::Relaxed);
        }
        self.arrived.notify_one();
    }

    /// Extends the ack wait of every message buffered for `older_than`.
    async fn keep_alive(&self, older_than: Duration) {
        let due: Vec<jetstream::Message> = match self.buffer.lock() {
            Ok(mut buffer) => {
                let now = Instant::now();
                buffer
                    .iter_mut()
                    .filter(|(_, since)| now.duration_since(*since) >= older_than)
                    .map(|(message, since)| {
                        *since = now;
                        message.clone()
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for message in due {
            if let Err(e) = message.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "Could not extend the ack wait of a buffered message.");
            }
        }
    }

    /// Refuses what is buffered, so it is delivered again at once.
    async fn release(&self) {
        let left: Vec<jetstream::Message> = match self.buffer.lock() {
            Ok(mut buffer) => buffer.drain(..).map(|(m, _)| m).collect(),
            Err(_) => Vec::new(),
        };
        self.depth.store(0, Ordering::Relaxed);
        for message in left {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// One consumer, read ahead into a bounded buffer.
pub(crate) struct Feed {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Feed {
    /// Starts pulling from `consumer` (named `name` in errors) into a
    /// buffer of at most `capacity` messages; `depth` follows its length.
    pub(crate) fn start(
        consumer: PullConsumer,
        name: String,
        capacity: usize,
        ack_wait: Duration,
        depth: Arc<AtomicUsize>,
    ) -> Self {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(VecDeque::with_capacity(capacity)),
            error: Mutex::new(None),
            arrived: Notify::new(),
            taken: Notify::new(),
            capacity: capacity.max(1),
            depth,
        });
        let stop = CancellationToken::new();
        tokio::spawn(pull(
            consumer,
            name,
            capacity.max(1),
            ack_wait,
            shared.clone(),
            stop.clone(),
        ));
        Self { shared, stop }
    }

    /// The next message, or the error of a failed pull (the feed goes on).
    pub(crate) async fn next(&self) -> Result<jetstream::Message, DeliveryError> {
        loop {
            let popped = match self.shared.buffer.lock() {
                Ok(mut buffer) => {
                    let popped = buffer.pop_front();
                    self.shared.depth.store(buffer.len(), Ordering::Relaxed);
                    popped.map(|(message, _)| (message, buffer.len()))
                }
                Err(_) => None,
            };
            if let Some((message, left)) = popped {
                // Wake the puller only when it has a pull to make, not for
                // every message taken.
                if left <= self.shared.capacity / 2 {
                    self.shared.taken.notify_one();
                }
                return Ok(message);
            }
            if let Some(error) = self.shared.error.lock().ok().and_then(|mut e| e.take()) {
                return Err(error);
            }
            self.shared.arrived.notified().await;
        }
    }
}

/// The pulling task: keeps the buffer at least half full while messages
/// are there to pull, and the buffered ones alive.
async fn pull(
    consumer: PullConsumer,
    name: String,
    capacity: usize,
    ack_wait: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let older_than = ack_wait / 3;
    let mut keepalive = tokio::time::interval((ack_wait / 4).max(Duration::from_millis(25)));
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'pulling: loop {
        // Pull once the buffer is at most half full, so the next batch is
        // under way before the reader runs dry.
        while shared.len() > capacity / 2 {
            tokio::select! {
                () = stop.cancelled() => break 'pulling,
                () = shared.taken.notified() => {}
                _ = keepalive.tick() => shared.keep_alive(older_than).await,
            }
        }
        let want = capacity.saturating_sub(shared.len()).max(1);
        let pulled = tokio::select! {
            () = stop.cancelled() => break 'pulling,
            pulled = consumer.batch().max_messages(want).expires(PULL_EXPIRES).messages() => pulled,
        };
        let mut batch = match pulled {
            Ok(batch) => batch,
            Err(e) => {
                failed(&shared, &name, e);
                tokio::select! {
                    () = stop.cancelled() => break 'pulling,
                    () = tokio::time::sleep(PULL_RETRY) => continue 'pulling,
                }
            }
        };
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break 'pulling,
                next = batch.next() => match next {
                    Some(Ok(message)) => shared.push(message),
                    // Delivered in full, or expired: pull again.
                    None => break,
                    Some(Err(e)) => {
                        failed(&shared, &name, e);
                        tokio::select! {
                            () = stop.cancelled() => break 'pulling,
                            () = tokio::time::sleep(PULL_RETRY) => break,
                        }
                    }
                },
                _ = keepalive.tick() => shared.keep_alive(older_than).await,
            }
        }
    }
    shared.release().await;
}

fn failed(shared: &Shared, name: &str, e: impl Into<crate::error::BoxError>) {
    let error = DeliveryError::with_source(DeliveryErrorKind::Pull(name.to_owned()), e);
    if let Ok(mut slot) = shared.error.lock() {
        *slot = Some(error);
    }
    shared.arrived.notify_one();
}

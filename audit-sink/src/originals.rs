//! `--redacted-original drop`: the original of a redacted delivery never
//! reaches ClickHouse.
//!
//! The sink reads `MESH_INGRESS` beside the policy worker, usually before
//! the worker has decided what it reads; the worker, set to drop originals,
//! erases a redacted event's original from the stream once its redacted
//! copies are stored and before it acks the event. So before the sink builds
//! the `events` row of ingress message `seq`, [`Gate::erased`] waits until
//! the worker's durable has acked everything up to `seq` (its ack floor),
//! then asks the stream whether `seq` is still there: an erased message's
//! row is written without data (`data_encoding` `dropped`), its payload
//! kept in no row, `rejected` included. While it waits, the message gets
//! progress acks so JetStream does not hand it out again.
//!
//! The `events` table then follows the worker: while the worker is down, or
//! one event of it waits to be redelivered, event rows wait too (nothing is
//! lost; the messages stay unacked in the stream).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, message::Acker};
use schemas::subjects;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Waits for the policy worker's decision of each ingress message.
pub(crate) struct Gate {
    js: jetstream::Context,
    /// The worker's durable on `MESH_INGRESS`.
    consumer: String,
    /// Its ack floor when last read: every message up to it is decided.
    floor: u64,
    /// How often a waiting message gets a progress ack.
    progress_every: Duration,
}

impl Gate {
    /// A gate on the worker's durable `consumer`; the sink's consumers
    /// redeliver after `ack_wait`.
    pub(crate) fn new(js: &jetstream::Context, consumer: &str, ack_wait: Duration) -> Self {
        Self {
            js: js.clone(),
            consumer: consumer.to_owned(),
            floor: 0,
            progress_every: (ack_wait / 3).max(Duration::from_millis(200)),
        }
    }

    /// Whether the worker has decided `seq`, as far as the gate knows
    /// without asking.
    pub(crate) fn decided(&self, seq: u64) -> bool {
        self.floor >= seq
    }

    /// Waits until the worker decided ingress message `seq`, then says
    /// whether it erased the message (a redacted event's dropped original).
    /// `None`: `shutdown` came first (the message stays unacked).
    pub(crate) async fn erased(
        &mut self,
        seq: u64,
        ack: &Acker,
        shutdown: &CancellationToken,
    ) -> Option<bool> {
        let mut backoff = Duration::from_millis(2);
        let mut next_progress = Instant::now() + self.progress_every;
        let mut warned = false;
        // First: the worker's ack floor passes `seq`.
        while !self.decided(seq) {
            match self.read_floor().await {
                Ok(floor) => self.floor = floor,
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(consumer = %self.consumer, %error, "Cannot read the policy worker's consumer on MESH_INGRESS (--redacted-original drop waits for its decisions); retrying.");
                }
                Err(_) => {}
            }
            if self.decided(seq) {
                break;
            }
            if !self
                .pause(&mut backoff, &mut next_progress, ack, shutdown)
                .await
            {
                return None;
            }
        }
        // Then: is it still in the stream?
        loop {
            match self.still_stored(seq).await {
                Ok(stored) => return Some(!stored),
                Err(error) => {
                    tracing::warn!(seq, %error, "Cannot read an ingress message back from MESH_INGRESS; retrying.");
                }
            }
            if !self
                .pause(&mut backoff, &mut next_progress, ack, shutdown)
                .await
            {
                return None;
            }
        }
    }

    /// Sleeps `backoff` (then doubles it, up to 200 ms), sending `ack` a
    /// progress ack when one is due; `false` when `shutdown` came.
    async fn pause(
        &self,
        backoff: &mut Duration,
        next_progress: &mut Instant,
        ack: &Acker,
        shutdown: &CancellationToken,
    ) -> bool {
        if Instant::now() >= *next_progress {
            let _ = ack.ack_with(AckKind::Progress).await;
            *next_progress = Instant::now() + self.progress_every;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_millis(200));
        true
    }

    /// The worker's ack floor on `MESH_INGRESS` (a stream sequence).
    async fn read_floor(&self) -> Result<u64, async_nats::Error> {
        let stream = self.js.get_stream_no_info(subjects::STREAM_INGRESS).await?;
        let info = stream.consumer_info(&self.consumer).await?;
        Ok(info.ack_floor.stream_sequence)
    }

    /// Whether `MESH_INGRESS` still holds message `seq`.
    async fn still_stored(&self, seq: u64) -> Result<bool, async_nats::Error> {
        use jetstream::stream::RawMessageErrorKind;
        let stream = self.js.get_stream_no_info(subjects::STREAM_INGRESS).await?;
        match stream.get_raw_message(seq).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

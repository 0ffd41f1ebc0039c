//! Notices when a stream loses messages it had acknowledged.
//!
//! nats-server 2.15 recovers a stream whose message block comes back
//! truncated or with a damaged record (a disk that lost the tail of a file,
//! a bad sector) without a word: it keeps the records before the damage,
//! logs `Restored N messages` and hands out the lost sequences again to the
//! next writes; the stream's info shows nothing lost. The worker had acked
//! the events those messages carried, so they would be gone silently.
//!
//! So the worker remembers, per stream, the last message it stored there
//! (the highest sequence a publish ack gave it, and that message's
//! `Nats-Msg-Id`) and checks every [`CHECK_EVERY`] that the stream still
//! holds that message at that sequence. When it does not — no message
//! there although the stream's first sequence is below it (retention or a
//! purge would have moved that past it), or another message in its place —
//! the stream lost acknowledged messages: the worker logs an error naming
//! the stream, the sequence and the event, and counts it on
//! `agentmesh_worker_stream_losses_total{stream}`. It reports; it cannot
//! bring the messages back (`docs/operations.md`, "A node back with a
//! damaged store", says what an operator does).
//!
//! Only the tail is watched: damage inside a block that leaves the last
//! message in place goes unseen here, and a worker that restarts together
//! with the server starts with no marks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, publish::PublishAck, stream::LastRawMessageErrorKind};
use tokio_util::sync::CancellationToken;

/// How often the marks are checked.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The last message this worker stored in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    sequence: u64,
    /// Its `Nats-Msg-Id`: the event's key.
    key: String,
}

/// The last message stored per stream.
#[derive(Debug, Default)]
pub(crate) struct Watermarks {
    marks: Mutex<HashMap<String, Mark>>,
}

/// What a check found wrong with one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loss {
    pub(crate) stream: String,
    pub(crate) sequence: u64,
    pub(crate) key: String,
    /// What the stream holds there now.
    pub(crate) found: Found,
}

/// What a stream holds at a marked sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// The marked message: nothing lost.
    Same,
    /// Another message (its `Nats-Msg-Id`, if any): the sequence was
    /// handed out again after the store lost it.
    Other(Option<String>),
    /// No message, and the stream's first sequence is `first`.
    Nothing { first: u64 },
}

impl Found {
    /// Whether the marked message is gone although retention did not take
    /// it: `Nothing` below the stream's first sequence is retention (or a
    /// purge), not a loss.
    fn lost(&self, sequence: u64) -> bool {
        match self {
            Self::Same => false,
            Self::Other(_) => true,
            Self::Nothing { first } => *first <= sequence,
        }
    }
}

impl Watermarks {
    /// Records a stored message (`key` is its `Nats-Msg-Id`); a duplicate's
    /// ack names the first copy's sequence, and an older one than the mark
    /// changes nothing.
    pub(crate) fn stored(&self, ack: &PublishAck, key: &str) {
        if ack.duplicate {
            return;
        }
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        match marks.get_mut(&ack.stream) {
            Some(mark) if mark.sequence >= ack.sequence => {}
            Some(mark) => {
                mark.sequence = ack.sequence;
                key.clone_into(&mut mark.key);
            }
            None => {
                marks.insert(
                    ack.stream.clone(),
                    Mark {
                        sequence: ack.sequence,
                        key: key.to_owned(),
                    },
                );
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, Mark)> {
        let marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        marks.iter().map(|(s, m)| (s.clone(), m.clone())).collect()
    }

    /// Forgets `stream`'s mark if it is still `mark` (a loss is reported
    /// once; the next stored message sets a new one).
    fn forget(&self, stream: &str, mark: &Mark) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        if marks.get(stream) == Some(mark) {
            marks.remove(stream);
        }
    }

    /// Checks every mark against its stream; returns the losses (each
    /// forgotten once returned). A stream that does not answer (the server
    /// is down) is checked next time.
    pub(crate) async fn check(&self, js: &jetstream::Context) -> Vec<Loss> {
        let mut losses = Vec::new();
        for (stream, mark) in self.snapshot() {
            let Some(found) = found_at(js, &stream, &mark).await else {
                continue;
            };
            match found {
                Found::Same => {}
                Found::Nothing { .. } if !found.lost(mark.sequence) => self.forget(&stream, &mark),
                found => {
                    self.forget(&stream, &mark);
                    losses.push(Loss {
                        stream,
                        sequence: mark.sequence,
                        key: mark.key,
                        found,
                    });
                }
            }
        }
        losses
    }
}

/// What `stream` holds at `mark`'s sequence; `None` when it cannot say.
async fn found_at(js: &jetstream::Context, stream: &str, mark: &Mark) -> Option<Found> {
    let handle = js.get_stream_no_info(stream).await.ok()?;
    match handle.get_raw_message(mark.sequence).await {
        Ok(message) => {
            let key = message
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned());
            Some(if key.as_deref() == Some(mark.key.as_str()) {
                Found::Same
            } else {
                Found::Other(key)
            })
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
            let first = handle.get_info().await.ok()?.state.first_sequence;
            Some(Found::Nothing { first })
        }
        Err(_) => None,
    }
}

/// Checks `marks` every [`CHECK_EVERY`] until `shutdown`, logging and
/// counting each loss.
pub(crate) fn spawn(
    marks: Arc<Watermarks>,
    js: jetstream::Context,
    losses: telemetry::StreamLosses,
    shutdown: CancellationToken,
) -> tokio_util::task::AbortOnDropHandle<()> {
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for loss in marks.check(&js).await {
                let now = match &loss.found {
                    Found::Other(Some(key)) => format!("holds another message (`{key}`) there"),
                    Found::Other(None) => "holds another message there".to_owned(),
                    Found::Nothing { .. } | Found::Same => "holds no message there".to_owned(),
                };
                tracing::error!(stream = %loss.stream, sequence = loss.sequence, event_key = %loss.key, "Stream `{}` lost messages it had acknowledged: it {now}, where this worker stored `{}` (a NATS node came back with a truncated or damaged store); the events of the lost messages were acked and are not redelivered: see docs/operations.md, \"A node back with a damaged store\".", loss.stream, loss.key);
                // Counted once logged: who sees the count finds the line.
                losses.add(&loss.stream);
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(stream: &str, sequence: u64, duplicate: bool) -> PublishAck {
        serde_json::from_value(serde_json::json!({
            "stream": stream, "seq": sequence, "duplicate": duplicate
        }))
        .unwrap()
    }

    #[test]
    fn the_mark_is_the_highest_new_message_per_stream() {
        let marks = Watermarks::default();
        marks.stored(&ack("D", 5, false), "a/5");
        marks.stored(&ack("D", 3, false), "a/3");
        marks.stored(&ack("D", 9, true), "a/1");
        marks.stored(&ack("R", 2, false), "a/2");
        let mut got = marks.snapshot();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                (
                    "D".to_owned(),
                    Mark {
                        sequence: 5,
                        key: "a/5".into()
                    }
                ),
                (
                    "R".to_owned(),
                    Mark {
                        sequence: 2,
                        key: "a/2".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn gone_below_the_first_sequence_is_retention_not_loss() {
        assert!(!Found::Same.lost(7));
        assert!(Found::Other(None).lost(7));
        assert!(Found::Other(Some("b/7".into())).lost(7));
        assert!(Found::Nothing { first: 1 }.lost(7));
        assert!(Found::Nothing { first: 7 }.lost(7));
        assert!(!Found::Nothing { first: 8 }.lost(7));
    }
}

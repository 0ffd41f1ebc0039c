//! Sends a routing plan's messages (`plan::Plan`) to JetStream.
//!
//! Every message is sent before any acknowledgement is awaited, so one
//! event costs one round trip however many copies it has, and many events
//! are in flight at once; the caller acks what caused the plan only once
//! this returns `Ok` (everything stored).

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};

use crate::plan::{Kind, Message};
use crate::watermarks::Watermarks;

/// Sends `messages` in order and waits until JetStream stored every one;
/// with `marks`, records each as the last message stored in its stream.
pub(crate) async fn send(
    js: &jetstream::Context,
    messages: Vec<Message>,
    marks: Option<&Watermarks>,
) -> Result<(), async_nats::Error> {
    let mut acks: Vec<(Kind, String, PublishAckFuture)> = Vec::with_capacity(messages.len());
    for message in messages {
        let mut publish = PublishMessage::build();
        // Headers first: the message id is one of them.
        if let Some(h) = message.headers {
            publish = publish.headers(h);
        }
        let publish = publish.payload(message.payload).message_id(&message.id);
        let kind = message.kind;
        let ack = js
            .send_publish(message.subject, publish)
            .await
            .map_err(|e| not_stored(kind, e.into()))?;
        acks.push((kind, message.id, ack));
    }
    for (kind, id, ack) in acks {
        let stored = ack.await.map_err(|e| not_stored(kind, e.into()))?;
        if let Some(marks) = marks {
            marks.stored(&stored, &id);
        }
    }
    Ok(())
}

/// The broker's error, naming what was not stored.
fn not_stored(kind: Kind, error: async_nats::Error) -> async_nats::Error {
    format!("{} was not stored: {error}", kind.as_str()).into()
}

//! Reading back what landed in a JetStream stream.

use anyhow::Context;
use async_nats::jetstream::{self, message::StreamMessage, stream::RawMessageErrorKind};

/// Every message stored in stream `name`, in sequence order; sequences that
/// are gone (deleted or purged) are passed over; any other failure to read
/// one is an error.
pub async fn stream_messages(
    js: &jetstream::Context,
    name: &str,
) -> anyhow::Result<Vec<StreamMessage>> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("getting stream {name}"))?;
    let state = stream
        .info()
        .await
        .with_context(|| format!("reading the state of stream {name}"))?
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(seq).await {
            Ok(m) => out.push(m),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("reading message {seq} of stream {name}"));
            }
        }
    }
    Ok(out)
}

/// The messages of stream `name` on exactly `subject`, in sequence order.
pub async fn subject_messages(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
) -> anyhow::Result<Vec<StreamMessage>> {
    Ok(stream_messages(js, name)
        .await?
        .into_iter()
        .filter(|m| m.subject.as_str() == subject)
        .collect())
}

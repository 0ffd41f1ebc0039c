//! Signed audit checkpoints (`docs/contract.md`, "Signed decisions"): the
//! record of `MESH_DECISION` kept outside ClickHouse, against which
//! `meshctl audit verify` finds rows altered, deleted or inserted there.
//!
//! Each sink replica with a signing key reads `MESH_DECISION` through the
//! shared durable `audit-chain` (replicas split the receipts between them),
//! and for each batch publishes one checkpoint on
//! `mesh.audit.checkpoint.<its public key>`: every receipt's stream
//! sequence, key, trace, time and the SHA-256 of its payload, in stream
//! order, and the SHA-256 of this signer's previous checkpoint — a hash
//! chain per signer — signed with its key. The batch is acked only once
//! the checkpoint is stored; a receipt redelivered after a crash appears in
//! two checkpoints with the same leaf, which the verifier accepts.
//!
//! This path is independent of the inserts: ClickHouse being down never
//! holds it back, and a row ClickHouse lost is what it is there to find.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage};
use futures::StreamExt;
use schemas::signing::{Checkpoint, CheckpointEntry, SigningKey, sha256_hex};
use schemas::{DecisionReceipt, headers, subjects};
use tokio_util::sync::CancellationToken;

/// The most receipts one checkpoint lists (a checkpoint stays well under
/// NATS' default 1 MiB payload limit at ~200 bytes an entry).
const MAX_ENTRIES: usize = 2000;

/// Creates (or finds) the `audit-chain` durable.
pub(crate) async fn consumer(js: &jetstream::Context) -> Result<PullConsumer, async_nats::Error> {
    let stream = js.get_stream(subjects::STREAM_DECISION).await?;
    Ok(stream
        .get_or_create_consumer(
            subjects::DURABLE_AUDIT_CHAIN,
            broker_config::audit_chain_consumer_config(),
        )
        .await?)
}

/// The SHA-256 of this signer's last stored checkpoint ('' if none).
async fn last_link(js: &jetstream::Context, subject: &str) -> Result<String, async_nats::Error> {
    let stream = js.get_stream(subjects::STREAM_AUDIT).await?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(sha256_hex(&message.payload)),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(String::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// The checkpoint entry of one `MESH_DECISION` message.
fn entry(message: &jetstream::Message) -> CheckpointEntry {
    let seq = message
        .info()
        .map(|i| i.stream_sequence)
        .unwrap_or_default();
    let receipt = serde_json::from_slice::<DecisionReceipt>(&message.payload).unwrap_or_default();
    let key = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| subjects::event_key(&receipt.agent, &receipt.event_id));
    CheckpointEntry {
        seq,
        key,
        trace_id: receipt.trace_id,
        decided_at: receipt.decided_at,
        leaf: sha256_hex(&message.payload),
    }
}

/// Runs the checkpointer until `shutdown`.
pub(crate) async fn run(
    js: jetstream::Context,
    consumer: PullConsumer,
    key: Arc<SigningKey>,
    batch_period: Duration,
    shutdown: CancellationToken,
) {
    let subject = subjects::audit_checkpoint(key.public_key());
    tracing::info!(
        signer = key.public_key(),
        "Checkpointing MESH_DECISION on MESH_AUDIT."
    );
    let mut prev = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let done = tokio::select! {
            () = shutdown.cancelled() => break,
            done = once(&js, &consumer, &key, &subject, &mut prev, batch_period) => done,
        };
        match done {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                // A failed publish may or may not have been stored: read the
                // chain's head again before the next one.
                prev = None;
                tracing::warn!(%error, retry_in = ?backoff, "Audit checkpoint failed; the receipts stay unacked and are checkpointed again.");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Pulls one batch and, when it is not empty, stores its checkpoint and
/// acks it.
async fn once(
    js: &jetstream::Context,
    consumer: &PullConsumer,
    key: &SigningKey,
    subject: &str,
    prev: &mut Option<String>,
    batch_period: Duration,
) -> Result<(), async_nats::Error> {
    let link = match prev.as_ref() {
        Some(link) => link.clone(),
        None => {
            let link = last_link(js, subject).await?;
            *prev = Some(link.clone());
            link
        }
    };
    let mut batch = consumer
        .fetch()
        .max_messages(MAX_ENTRIES)
        .expires(batch_period.max(Duration::from_millis(100)))
        .messages()
        .await?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message?);
    }
    if messages.is_empty() {
        return Ok(());
    }
    let mut entries: Vec<CheckpointEntry> = messages.iter().map(entry).collect();
    entries.sort_by_key(|e| e.seq);
    entries.dedup_by_key(|e| e.seq);
    let checkpoint = Checkpoint {
        version: 1,
        signer: key.public_key().to_owned(),
        prev: link,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        entries,
    };
    let payload = serde_json::to_vec(&checkpoint)?;
    let mut h = HeaderMap::new();
    h.insert(headers::SIGNER, key.public_key());
    h.insert(headers::SIGNATURE, key.sign(&payload).as_str());
    let link = sha256_hex(&payload);
    js.send_publish(
        subject.to_owned(),
        PublishMessage::build()
            .headers(h)
            .payload(payload.into())
            .message_id(link.as_str()),
    )
    .await?
    .await?;
    *prev = Some(link);
    for message in &messages {
        if let Err(error) = message.ack().await {
            tracing::debug!(%error, "Ack of a checkpointed receipt failed; it will be checkpointed again.");
        }
    }
    tracing::debug!(receipts = messages.len(), "Audit checkpoint stored.");
    Ok(())
}

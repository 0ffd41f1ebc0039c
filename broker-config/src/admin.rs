//! What an operator's tool does to the mesh's streams and buckets besides
//! setting them up (`meshctl approvals`, `meshctl cache`), and what a
//! service reads of them for its metrics: answering an approval request,
//! purging and sizing the tool-result cache. The names and keys are the
//! contract's (`schemas::approval`, `schemas::cache`).

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt as _;
use schemas::approval::Answer;
use schemas::subjects;

/// Publishes `answer` for an event of `agent` and waits until JetStream
/// stored it. The same action twice within the duplicate window is stored
/// once (`Answer::message_id`).
pub async fn send_answer(
    js: &jetstream::Context,
    agent: &str,
    answer: &Answer,
) -> Result<(), async_nats::Error> {
    let body = serde_json::to_vec(answer)?;
    js.send_publish(
        subjects::approval_answer(agent, &answer.id),
        PublishMessage::build()
            .payload(body.into())
            .message_id(answer.message_id()),
    )
    .await?
    .await?;
    Ok(())
}

/// Removes cached results from `mesh-tool-cache`: every result of `tool`,
/// or everything (results and the records of calls in flight) when `None`.
/// Returns how many messages were removed.
pub async fn purge_tool_cache(
    js: &jetstream::Context,
    tool: Option<&str>,
) -> Result<u64, async_nats::Error> {
    let stream = js
        .get_stream(format!("KV_{}", subjects::BUCKET_TOOL_CACHE))
        .await?;
    let purged = stream
        .purge()
        .filter(schemas::cache::purge_filter(tool))
        .await?;
    Ok(purged.purged)
}

/// How many results `mesh-tool-cache` holds (read from its stream, one
/// subject per result), and the bucket's bytes (results and the records of
/// calls in flight).
pub async fn tool_cache_size(
    bucket: &jetstream::stream::Stream,
) -> Result<(u64, u64), async_nats::Error> {
    let mut info = bucket
        .info_with_subjects(schemas::cache::results_filter())
        .await?;
    let bytes = info.info.state.bytes;
    let mut entries = 0;
    while let Some(subject) = info.next().await {
        subject?;
        entries += 1;
    }
    Ok((entries, bytes))
}

//! The raw forwarder: the floor the policy worker is measured against. The
//! same consume → republish → ack path over the same streams, with no
//! decoding, no policy and no receipt: it routes on the raw `ce-target` and
//! `ce-id` headers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use schemas::subjects;

/// Consumer name of the raw forwarder on `MESH_INGRESS`.
pub(crate) const CONSUMER: &str = "raw-forwarder";

/// Runs the forwarder until the process is killed.
pub(crate) async fn run(
    nats_url: &str,
    batch: usize,
    in_flight: usize,
    ready_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(in_flight * 2)
        .backpressure_on_inflight(true)
        .build(client);
    broker_config::apply(&js, &broker_config::Options::default()).await?;
    let consumer = js
        .get_stream(subjects::STREAM_INGRESS)
        .await?
        .get_or_create_consumer(
            CONSUMER,
            jetstream::consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: (in_flight * 4).max(1024) as i64,
                ..Default::default()
            },
        )
        .await?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await?;
    if let Some(path) = ready_file {
        std::fs::write(path, "ready\n")?;
    }
    messages
        .filter_map(|m| async move { m.ok() })
        .map(|message| {
            let js = js.clone();
            async move {
                let agent = subjects::parse_ingress(&message.subject)
                    .map_or("unknown", |p| p.agent)
                    .to_owned();
                let headers = message.headers.clone().unwrap_or_default();
                let raw = |name: &str| {
                    headers
                        .get(name)
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default()
                };
                let (target, id) = (raw("ce-target"), raw("ce-id"));
                let publish = PublishMessage::build()
                    .headers(headers)
                    .payload(message.payload.clone())
                    .message_id(id);
                let stored = match js
                    .send_publish(subjects::deliver(&target, &agent), publish)
                    .await
                {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if stored {
                    let _ = message.ack().await;
                }
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
    Ok(())
}

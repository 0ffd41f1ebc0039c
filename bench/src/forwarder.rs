//! The raw forwarder: the floor the policy worker is measured against. The
//! same consume → republish → ack path over the same streams, with no
//! decoding and no policy: it routes on the raw `ce-target` and `ce-id`
//! headers. With `receipt`, it also publishes a JSON receipt of about 300 B
//! on `mesh.decision.<agent>` and acks only once both copies are stored:
//! the two stored writes per event the mesh contract asks for, and so the
//! floor of any policy worker.
//!
//! Like the worker, each event is handled on its own task, so the
//! forwarder uses every thread of the runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use schemas::subjects;
use tokio_util::task::AbortOnDropHandle;

/// Consumer name of the raw forwarder on `MESH_INGRESS`.
pub(crate) const CONSUMER: &str = "raw-forwarder";

/// Runs the forwarder until the process is killed.
pub(crate) async fn run(
    nats_url: &str,
    batch: usize,
    in_flight: usize,
    receipt: bool,
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
    let js = Arc::new(js);
    messages
        .filter_map(|m| async move { m.ok() })
        .map(|message| AbortOnDropHandle::new(tokio::spawn(forward(js.clone(), message, receipt))))
        .buffer_unordered(in_flight)
        .for_each(|_| async {})
        .await;
    Ok(())
}

/// Forwards one message (and publishes its receipt) and acks it once every
/// copy is stored.
async fn forward(js: Arc<jetstream::Context>, message: jetstream::Message, receipt: bool) {
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
    let key = subjects::event_key(&agent, &id);
    let receipt_ack = if receipt {
        let body = format!(
            r#"{{"decision_id":"{}","event_id":"{id}","agent":"{agent}","decision":"allow","policy_hash":"0000000000000000","ingress_subject":"{}","target":"{target}","reasons":["raw-forwarder"],"errors":[],"eval_micros":0}}"#,
            uuid::Uuid::now_v7(),
            message.subject,
        );
        match js
            .send_publish(
                subjects::decision(&agent),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(key.as_str()),
            )
            .await
        {
            Ok(ack) => Some(ack),
            Err(_) => return,
        }
    } else {
        None
    };
    let publish = PublishMessage::build()
        .headers(headers)
        .payload(message.payload.clone())
        .message_id(key);
    let stored = match js
        .send_publish(subjects::deliver(&target, &agent), publish)
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    let receipt_stored = match receipt_ack {
        Some(ack) => ack.await.is_ok(),
        None => true,
    };
    if stored && receipt_stored {
        let _ = message.ack().await;
    }
}

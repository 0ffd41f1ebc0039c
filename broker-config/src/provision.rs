//! Durable consumers the operator creates for principals that may not
//! create their own (see `auth.rs` for why): each agent's `agent-<id>` on
//! `MESH_DELIVER` and `receipts-<id>` on `MESH_DECISION`, and the audit
//! sink's and policy worker's durables.
//!
//! They are created as pull consumers with the settings their owners ask
//! for, so the owner's own create request later is an update the server
//! accepts; it cannot turn them into push consumers.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use schemas::subjects;

use crate::Change;
use crate::auth::{
    AUDIT_SINK_CONSUMERS, POLICY_WORKER_APPROVALS_CONSUMER, POLICY_WORKER_CONSUMER,
    agent_calls_filter, agent_consumer, agent_filter, receipts_consumer,
};

/// Why a consumer could not be provisioned or removed.
#[derive(Debug, thiserror::Error)]
#[error("consumer `{consumer}` on `{stream}`: {source}")]
pub struct ProvisionError {
    /// The stream.
    pub stream: String,
    /// The durable name.
    pub consumer: String,
    /// The broker's answer.
    pub source: async_nats::Error,
}

/// The settings of agent `id`'s durable, as the agents SDK creates it.
pub fn agent_consumer_config(id: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(agent_consumer(id)),
        description: Some(format!("deliveries to agent `{id}`")),
        filter_subject: agent_filter(id),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 1000,
        ..Default::default()
    }
}

/// The settings of agent `id`'s receipts durable on `MESH_DECISION`, as a
/// client creates it (`examples/python/publish_event.py` does): pull, every
/// receipt from the start, explicit acks.
pub fn receipts_consumer_config(id: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(receipts_consumer(id)),
        description: Some(format!("decision receipts of agent `{id}`")),
        filter_subject: subjects::decision(id),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 1000,
        ..Default::default()
    }
}

/// The settings of agent `id`'s durable of tool calls on `MESH_CALL` (named
/// like its delivery durable: `agent-<id>`), as the agents SDK creates it.
pub fn agent_calls_consumer_config(id: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(agent_consumer(id)),
        description: Some(format!("tool calls to agent `{id}`")),
        filter_subject: agent_calls_filter(id),
        ..agent_consumer_config(id)
    }
}

/// The settings of the policy worker's durable `name` of approval answers
/// on `MESH_APPROVALS`, as the worker creates it.
pub fn approvals_consumer_config(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        description: Some("policy worker: approval answers".into()),
        filter_subject: subjects::APPROVAL_ANSWERS.into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    }
}

/// The audit sink's durable `audit-chain` on `MESH_DECISION`, which feeds
/// its signed checkpoints, as the sink creates it.
pub fn audit_chain_consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::DURABLE_AUDIT_CHAIN.to_owned()),
        description: Some("audit sink: signed checkpoints of every receipt".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Every durable the services read from, with the settings they use by
/// default: (stream, config).
pub fn service_consumer_configs() -> Vec<(&'static str, consumer::pull::Config)> {
    let mut configs = vec![(
        subjects::STREAM_INGRESS,
        consumer::pull::Config {
            durable_name: Some(POLICY_WORKER_CONSUMER.to_owned()),
            description: Some("policy worker: one decision per ingress event".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 2048,
            ..Default::default()
        },
    )];
    for (stream, durable) in AUDIT_SINK_CONSUMERS {
        let table = match stream {
            subjects::STREAM_INGRESS => "events",
            subjects::STREAM_DECISION => "decisions",
            _ => "gpu_leases",
        };
        configs.push((
            stream,
            consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                description: Some(format!("audit sink: every message into `{table}`")),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: -1,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        ));
    }
    configs.push((subjects::STREAM_DECISION, audit_chain_consumer_config()));
    configs.push((
        subjects::STREAM_APPROVALS,
        approvals_consumer_config(POLICY_WORKER_APPROVALS_CONSUMER),
    ));
    configs
}

/// Creates `config` on `stream` unless a consumer of that name exists
/// (an existing one is left as it is: its owner may have tuned it).
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
) -> Result<Change, ProvisionError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let err = |source: async_nats::Error| ProvisionError {
        stream: stream.to_owned(),
        consumer: name.clone(),
        source,
    };
    let handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| err(e.into()))?;
    match handle.consumer_info(&name).await {
        Ok(_) => Ok(Change::Unchanged),
        Err(e) if is_not_found(&e) => {
            handle
                .create_consumer(config)
                .await
                .map_err(|e| err(e.into()))?;
            tracing::info!(%stream, consumer = %name, "Consumer provisioned.");
            Ok(Change::Created)
        }
        Err(e) => Err(err(e.into())),
    }
}

/// Creates agent `id`'s durables that are missing: deliveries on
/// `MESH_DELIVER`, receipts on `MESH_DECISION`, tool calls on `MESH_CALL`
/// (when the stream exists). [`Change::Created`] when the delivery or the
/// receipts durable was.
pub async fn provision_agent(js: &jetstream::Context, id: &str) -> Result<Change, ProvisionError> {
    let deliveries =
        ensure_consumer(js, subjects::STREAM_DELIVER, agent_consumer_config(id)).await?;
    let receipts =
        ensure_consumer(js, subjects::STREAM_DECISION, receipts_consumer_config(id)).await?;
    ensure_consumer(js, subjects::STREAM_CALL, agent_calls_consumer_config(id)).await?;
    Ok(
        if deliveries == Change::Created || receipts == Change::Created {
            Change::Created
        } else {
            Change::Unchanged
        },
    )
}

/// Creates the services' durables that are missing.
pub async fn provision_services(
    js: &jetstream::Context,
) -> Result<Vec<(String, Change)>, ProvisionError> {
    let mut changes = Vec::new();
    for (stream, config) in service_consumer_configs() {
        let name = config.durable_name.clone().unwrap_or_default();
        changes.push((name, ensure_consumer(js, stream, config).await?));
    }
    Ok(changes)
}

/// Deletes agent `id`'s durables: deliveries, tool calls and receipts
/// (their messages stay in the streams until they age out). `false` when
/// there was none.
pub async fn remove_agent(js: &jetstream::Context, id: &str) -> Result<bool, ProvisionError> {
    let mut removed = false;
    for (stream, name) in [
        (subjects::STREAM_DELIVER, agent_consumer(id)),
        (subjects::STREAM_CALL, agent_consumer(id)),
        (subjects::STREAM_DECISION, receipts_consumer(id)),
    ] {
        removed |= delete_consumer(js, stream, name).await?;
    }
    Ok(removed)
}

/// Deletes consumer `name` of `stream`; `false` when there was none (or no
/// such stream: a broker config older than `MESH_CALL`).
async fn delete_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: String,
) -> Result<bool, ProvisionError> {
    let err = |source: async_nats::Error| ProvisionError {
        stream: stream.to_owned(),
        consumer: name.clone(),
        source,
    };
    let handle = match js.get_stream_no_info(stream).await {
        Ok(handle) => handle,
        Err(e) => return Err(err(e.into())),
    };
    match handle.delete_consumer(&name).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                    || j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(false)
            }
            _ => Err(err(e.into())),
        },
    }
}

fn is_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    match e.kind() {
        jetstream::context::ConsumerInfoErrorKind::NotFound => true,
        jetstream::context::ConsumerInfoErrorKind::JetStream(j) => {
            j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
        }
        _ => false,
    }
}

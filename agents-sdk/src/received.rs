//! A mesh event received by this agent ([`Received`]): decoded from a
//! delivery or a call, validated and typed with `schemas`. What deliveries,
//! tool calls, A2A requests and answers to calls are made of.

use async_nats::HeaderMap;
use schemas::{AgentId, AttributesReader, Event, EventType, Invalid, MeshEvent, TraceParent};
use serde::de::DeserializeOwned;

/// A mesh event received by this agent: decoded, validated, typed.
#[derive(Debug, Clone)]
pub struct Received {
    event: MeshEvent,
}

impl Received {
    /// Decodes a message from `mesh.deliver.<target>.<source>` (or, for a
    /// tool call, `mesh.call.<target>.<source>`).
    pub fn from_delivery(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<Self, Invalid> {
        let source = schemas::subjects::parse_routed(subject)
            .map(|routed| routed.source)
            .ok_or_else(|| Invalid::Subject(subject.to_owned()))?;
        let size = schemas::message_size(headers, payload);
        let (event, mode) = schemas::decode(headers, payload)?;
        Ok(Self {
            event: MeshEvent::validate(source, event, mode, size)?,
        })
    }

    /// The event id.
    pub fn id(&self) -> &str {
        self.event.id()
    }

    /// The catalogue type.
    pub fn event_type(&self) -> EventType {
        self.event.event_type
    }

    /// The agent that sent it (its `source`).
    pub fn sender(&self) -> &AgentId {
        &self.event.agent
    }

    /// The `target` (this agent, for a delivery).
    pub fn target(&self) -> Option<&AgentId> {
        self.event.target.as_ref()
    }

    /// The event's trace (derived from its id when it had no `traceparent`,
    /// as the policy worker derives it).
    pub fn trace(&self) -> TraceParent {
        self.event.trace
    }

    /// The trace id, 32 hex characters.
    pub fn trace_id(&self) -> String {
        self.event.trace.trace_id_hex()
    }

    /// The `causationid`: the event this one answers or follows.
    pub fn causation_id(&self) -> Option<&str> {
        self.event.causation_id.as_deref()
    }

    /// The CloudEvents `subject` (the tool of a tool call or result).
    pub fn subject(&self) -> Option<&str> {
        self.event.event.subject()
    }

    /// The CloudEvent.
    pub fn event(&self) -> &Event {
        &self.event.event
    }

    /// The validated mesh event.
    pub fn mesh_event(&self) -> &MeshEvent {
        &self.event
    }

    /// The data, as bytes.
    pub fn data(&self) -> Vec<u8> {
        self.event.data_bytes()
    }

    /// The data parsed as JSON into `T`, e.g. a [`payload`](crate::payload)
    /// type: `received.json::<payload::TaskHandoff>()`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data())
    }
}

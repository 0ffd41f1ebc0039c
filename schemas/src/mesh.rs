//! A validated mesh event: a CloudEvent that meets every rule of `docs/contract.md`
//! for the subject it arrived on.

use async_nats::HeaderMap;
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Data, Event};

use crate::agent::AgentId;
use crate::binding::{self, BindingError, ContentMode};
use crate::catalogue::EventType;
use crate::subjects;
use crate::traceparent::TraceParent;

/// The default size limit of one event (headers and payload): 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Names of the extension attributes agentmesh uses.
pub mod ext {
    /// W3C trace context (distributed-tracing extension).
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state (distributed-tracing extension).
    pub const TRACESTATE: &str = "tracestate";
    /// The id of the event this step answers or follows.
    pub const CAUSATIONID: &str = "causationid";
    /// The `source` of the event named by `causationid` (e.g.
    /// `/agents/planner`): with it, a causation link stays exact when two
    /// agents use the same event id. Optional; agents-sdk sets it.
    pub const CAUSATIONSOURCE: &str = "causationsource";
    /// The recipient agent id: present means "route on approval".
    pub const TARGET: &str = "target";
}

/// Limits applied while validating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted event, headers and payload together, in bytes.
    pub max_event_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// Why an ingress message is not a valid mesh event; the decision is `invalid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// The event is larger than the configured limit.
    #[error("event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Headers and payload, in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The subject is not `mesh.ingress.<agent>.<step>`.
    #[error("subject `{0}` is not `mesh.ingress.<agent>.<step>`")]
    Subject(String),
    /// The message is not a well-formed CloudEvent.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// `source` is not `/agents/<agent>` for the subject's agent.
    #[error("source `{given}` does not match the subject's agent: expected `/agents/{agent}`")]
    SourceMismatch {
        /// The `source` attribute.
        given: String,
        /// The subject's agent token.
        agent: String,
    },
    /// The subject's agent token is not a valid agent id.
    #[error(transparent)]
    Agent(#[from] crate::agent::InvalidAgentId),
    /// `type` is outside the catalogue.
    #[error(transparent)]
    Type(#[from] crate::catalogue::UnknownEventType),
    /// `traceparent` is malformed.
    #[error(transparent)]
    TraceParent(#[from] crate::traceparent::InvalidTraceParent),
    /// An extension that must be a string is not.
    #[error("attribute `{0}` must be a string")]
    NotAString(&'static str),
    /// `target` is not a valid agent id.
    #[error("target `{0}` is not a valid agent id")]
    Target(String),
    /// `causationsource` is not `/agents/<agent>`.
    #[error("causationsource `{0}` is not `/agents/<agent>` with a valid agent id")]
    CausationSource(String),
    /// A `tool.call` without `subject`.
    #[error("a `io.agentmesh.tool.call` event must name its tool in `subject`")]
    MissingTool,
    /// `id` is empty.
    #[error("attribute `id` is empty")]
    EmptyId,
}

/// A CloudEvent that passed every check of the mesh contract.
#[derive(Debug, Clone)]
pub struct MeshEvent {
    /// The decoded event.
    pub event: Event,
    /// The binding mode it arrived in.
    pub mode: ContentMode,
    /// The publishing agent (from `source`, equal to the subject token).
    pub agent: AgentId,
    /// The catalogue type.
    pub event_type: EventType,
    /// The trace: from `traceparent`, or derived from the id when absent.
    pub trace: TraceParent,
    /// Whether `trace` was derived because the event had no `traceparent`.
    pub trace_derived: bool,
    /// `causationid`, when present.
    pub causation_id: Option<String>,
    /// The agent of `causationsource` (`/agents/<agent>`), when present.
    pub causation_agent: Option<String>,
    /// `target`, when present.
    pub target: Option<AgentId>,
    /// Headers and payload, in bytes.
    pub size: usize,
}

fn string_ext<'a>(event: &'a Event, name: &'static str) -> Result<Option<&'a str>, Invalid> {
    match event.extension(name) {
        None => Ok(None),
        Some(ExtensionValue::String(s)) => Ok(Some(s)),
        Some(_) => Err(Invalid::NotAString(name)),
    }
}

/// The size of a NATS message as the mesh counts it: header names, values
/// and payload.
pub fn message_size(headers: Option<&HeaderMap>, payload: &[u8]) -> usize {
    let header_bytes: usize = headers
        .map(|h| {
            h.iter()
                .map(|(name, values)| {
                    let name: &str = name.as_ref();
                    values
                        .iter()
                        .map(|v| name.len() + v.as_str().len() + 4)
                        .sum::<usize>()
                })
                .sum()
        })
        .unwrap_or(0);
    header_bytes + payload.len()
}

impl MeshEvent {
    /// Decodes and validates an ingress message that arrived on `subject`.
    pub fn from_message(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        limits: Limits,
    ) -> Result<Self, Invalid> {
        let size = message_size(headers, payload);
        if size > limits.max_event_bytes {
            return Err(Invalid::TooLarge {
                size,
                limit: limits.max_event_bytes,
            });
        }
        let parts = subjects::parse_ingress(subject)
            .filter(|p| !p.step.is_empty())
            .ok_or_else(|| Invalid::Subject(subject.to_owned()))?;
        let (event, mode) = binding::decode(headers, payload)?;
        Self::validate(parts.agent, event, mode, size)
    }

    /// Validates a decoded event against the agent token of its subject.
    pub fn validate(
        subject_agent: &str,
        event: Event,
        mode: ContentMode,
        size: usize,
    ) -> Result<Self, Invalid> {
        let agent = AgentId::new(subject_agent)?;
        let source = binding::source_str(&event);
        if source.strip_prefix("/agents/") != Some(agent.as_str()) {
            return Err(Invalid::SourceMismatch {
                given: source.to_owned(),
                agent: agent.to_string(),
            });
        }
        if event.id().is_empty() {
            return Err(Invalid::EmptyId);
        }
        let event_type: EventType = event.ty().parse()?;
        let (trace, trace_derived) = match string_ext(&event, ext::TRACEPARENT)? {
            Some(tp) => (tp.parse()?, false),
            None => (TraceParent::derive(event.id()), true),
        };
        let causation_id = string_ext(&event, ext::CAUSATIONID)?.map(str::to_owned);
        let causation_agent = string_ext(&event, ext::CAUSATIONSOURCE)?
            .map(|s| {
                s.strip_prefix("/agents/")
                    .and_then(|a| AgentId::new(a).ok())
                    .map(|a| a.to_string())
                    .ok_or_else(|| Invalid::CausationSource(s.to_owned()))
            })
            .transpose()?;
        let target = string_ext(&event, ext::TARGET)?
            .map(|t| AgentId::new(t).map_err(|_| Invalid::Target(t.to_owned())))
            .transpose()?;
        if event_type == EventType::ToolCall && event.subject().is_none_or(str::is_empty) {
            return Err(Invalid::MissingTool);
        }
        Ok(Self {
            event,
            mode,
            agent,
            event_type,
            trace,
            trace_derived,
            causation_id,
            causation_agent,
            target,
            size,
        })
    }

    /// The event id.
    pub fn id(&self) -> &str {
        self.event.id()
    }

    /// The tool a `tool.call` names (its `subject`), else `None`.
    pub fn tool(&self) -> Option<&str> {
        (self.event_type == EventType::ToolCall)
            .then(|| self.event.subject())
            .flatten()
    }

    /// The data as bytes, however it was carried (JSON in structured mode is
    /// re-serialised compactly).
    pub fn data_bytes(&self) -> Vec<u8> {
        match self.event.data() {
            None => Vec::new(),
            Some(Data::Binary(b)) => b.clone(),
            Some(Data::String(s)) => s.as_bytes().to_vec(),
            Some(Data::Json(v)) => serde_json::to_vec(v).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::encode_binary;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event(source: &str, ty: &str) -> EventBuilderV10 {
        EventBuilderV10::new().id("e1").source(source).ty(ty)
    }

    fn check(subject: &str, e: EventBuilderV10) -> Result<MeshEvent, Invalid> {
        let (h, p) = encode_binary(&e.build().unwrap());
        MeshEvent::from_message(subject, Some(&h), &p, Limits::default())
    }

    #[test]
    fn valid_event() {
        let m = check(
            "mesh.ingress.planner.handoff",
            event("/agents/planner", "io.agentmesh.task.handoff").extension("target", "coder"),
        )
        .unwrap();
        assert_eq!(m.agent.as_str(), "planner");
        assert_eq!(m.target.unwrap().as_str(), "coder");
        assert!(m.trace_derived);
        assert_eq!(m.trace, TraceParent::derive("e1"));
    }

    #[test]
    fn invalid_events() {
        let s = "mesh.ingress.planner.x";
        assert!(matches!(
            check(s, event("/agents/coder", "io.agentmesh.prompt")),
            Err(Invalid::SourceMismatch { .. })
        ));
        assert!(matches!(
            check(s, event("planner", "io.agentmesh.prompt")),
            Err(Invalid::SourceMismatch { .. })
        ));
        assert!(matches!(
            check(s, event("/agents/planner", "io.agentmesh.bogus")),
            Err(Invalid::Type(_))
        ));
        assert!(matches!(
            check(s, event("/agents/planner", "io.agentmesh.tool.call")),
            Err(Invalid::MissingTool)
        ));
        assert!(matches!(
            check(
                s,
                event("/agents/planner", "io.agentmesh.prompt").extension("target", "Bad Target")
            ),
            Err(Invalid::Target(_))
        ));
        assert!(matches!(
            check(
                s,
                event("/agents/planner", "io.agentmesh.prompt").extension("traceparent", "nope")
            ),
            Err(Invalid::TraceParent(_))
        ));
        assert!(matches!(
            check(
                "mesh.ingress.planner",
                event("/agents/planner", "io.agentmesh.prompt")
            ),
            Err(Invalid::Subject(_))
        ));
        assert!(matches!(
            check(
                "mesh.ingress.Planner.x",
                event("/agents/Planner", "io.agentmesh.prompt")
            ),
            Err(Invalid::Agent(_))
        ));
    }

    #[test]
    fn size_limit() {
        let e = event("/agents/planner", "io.agentmesh.prompt")
            .data("text/plain", "x".repeat(2000))
            .build()
            .unwrap();
        let (h, p) = encode_binary(&e);
        let r = MeshEvent::from_message(
            "mesh.ingress.planner.x",
            Some(&h),
            &p,
            Limits {
                max_event_bytes: 1000,
            },
        );
        assert!(matches!(r, Err(Invalid::TooLarge { limit: 1000, .. })));
    }
}

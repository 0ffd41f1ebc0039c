//! The agentmesh wire contract: CloudEvents over NATS in both modes of the
//! CloudEvents NATS binding, the event-type catalogue, validation of mesh
//! events, W3C `traceparent`, decision receipts, the approval wire types
//! ([`approval`]), the `mesh-limits` keys and values ([`limits`]), the
//! `mesh-gpu-leases` values ([`gpu`]) and the subject names of
//! `docs/contract.md`.
//!
//! Every service and the SDK speak through this crate, so the contract lives
//! in one place.

mod agent;
pub mod approval;
mod binding;
pub mod cache;
mod catalogue;
pub mod flows;
pub mod gpu;
pub mod limits;
pub mod merkle;
mod mesh;
mod receipt;
mod salvage;
pub mod servers;
pub mod signing;
pub mod subjects;
mod traceparent;

pub use agent::{AgentId, InvalidAgentId};
pub use approval::{Answer, AnswerAction, ApprovalState};
pub use binding::{
    BindingError, ContentMode, STRUCTURED_CONTENT_TYPE, decode, encode_binary, encode_structured,
    percent_decode_header, percent_encode_header,
};
pub use catalogue::{EventType, TYPE_PREFIX, UnknownEventType};
pub use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
pub use mesh::{DEFAULT_MAX_EVENT_BYTES, Invalid, Limits, MeshEvent, ext, message_size};
pub use receipt::{Approval, ApprovalStatus, CacheStatus, Decision, DecisionReceipt, headers};
pub use salvage::RawAttributes;
pub use traceparent::{InvalidTraceParent, TraceParent};

//! The decision engine of the policy worker, without I/O: a validated
//! Cedar policy set ([`PolicyBundle`]) and its guardrails — payload
//! detectors ([`Detector`]), the rate and budget records Cedar sees
//! ([`Tallies`]), the permits that wait for a human
//! ([`APPROVAL_ANNOTATION`]), workflow labels (`flows.toml`: [`FlowRules`])
//! and redacted allows ([`REDACT_ANNOTATION`]) — the evaluation of one event with them
//! ([`evaluate`]), and [`Replayer`], which decides recorded events with a
//! candidate set the way the worker would. [`CardSchemas`] checks a tool
//! call's arguments against the input schema of its tool's agent card
//! (the card of the call's target, [`card_agent`]; [`AgentCards`] holds
//! many agents' cards for the replay).
//!
//! The policy worker wraps it in the broker (counters in JetStream KV,
//! parking, publishing); `meshctl` uses it to check and replay policies.
//! Nothing here talks to NATS or needs a runtime: it reads a policy
//! directory from disk and decides.

mod arguments;
mod cache;
mod detect;
mod evaluate;
mod fields;
mod flows;
mod guard;
mod limits;
mod policy;
mod properties;
mod redact;
mod replay;

pub use arguments::{AgentCards, CardError, CardSchemas, INPUT_SCHEMA, MAX_VIOLATIONS, card_agent};
pub use cache::{CACHE_FILE, CacheRules, Scope as CacheScope, ToolRule, canonical};
pub use detect::{BuildError, Detector, Findings, KINDS as DETECTOR_KINDS};
pub use evaluate::{Evaluation, Needs, evaluate};
pub use flows::{FLOWS_FILE, FlowRules, FlowState};
pub use guard::{APPROVAL_ANNOTATION, GuardMeta, Guards, REDACT_ANNOTATION};
pub use limits::{MemoryCounters, Tallies};
pub use policy::{
    ENTITIES_FILE, LoadError, PolicyBundle, SCHEMA_FILE, UNREGISTERED_AGENT, Verdict,
    generated_policies,
};
pub use properties::{Check, PROPERTIES_FILE, Properties, Property};
pub use redact::{RedactError, Redacted, covers as redaction_covers, replacement as redaction_of};
pub use replay::{Outcome, Replayed, Replayer};

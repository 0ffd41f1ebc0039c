//! Policy replay: recorded events decided again by a candidate policy set,
//! the way the worker would decide them — validation, payload detectors,
//! rate and budget counters, approval annotations — to compare with the
//! decisions they got.
//!
//! The counters are simulated in memory over the replayed events in the
//! order given, with each event's recorded arrival time as the clock; events
//! before the replayed range are not counted, so counts start low.
//!
//! Given the agents' cards ([`Replayer::with_cards`]), a tool call is first
//! checked against its tool's input schema, as the worker checks it before
//! any guardrail or policy: one that breaks it is `invalid` with reason
//! [`INPUT_SCHEMA`] and the violations as errors, whatever the policies say.

use std::sync::Mutex;

use async_nats::HeaderMap;
use schemas::{DecisionReceipt, Limits, MeshEvent, subjects};

use crate::arguments::{AgentCards, INPUT_SCHEMA};
use crate::detect::Detector;
use crate::evaluate::{Needs, evaluate};
use crate::guard::Guards;
use crate::limits::MemoryCounters;
use crate::policy::PolicyBundle;

/// What a policy set decides (or decided) for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Allowed.
    Allow,
    /// Allowed by a permit that requires an approval: parked for a human.
    Approval,
    /// Denied.
    Deny,
    /// Not a valid mesh event.
    Invalid,
}

impl Outcome {
    /// `allow`, `approval`, `deny` or `invalid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Approval => "approval",
            Self::Deny => "deny",
            Self::Invalid => "invalid",
        }
    }

    /// The outcome a receipt records: an event that waited for a human is
    /// `approval`, whatever the human answered.
    pub fn of_receipt(receipt: &DecisionReceipt) -> Self {
        if receipt.approval.is_some() {
            return Self::Approval;
        }
        match receipt.decision {
            schemas::Decision::Allow => Self::Allow,
            schemas::Decision::Deny => Self::Deny,
            schemas::Decision::Invalid => Self::Invalid,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The candidate set's decision on one replayed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The outcome.
    pub outcome: Outcome,
    /// Ids of the determining policies.
    pub reasons: Vec<String>,
    /// Evaluation or validation errors.
    pub errors: Vec<String>,
    /// What the detectors found (when the candidate set reads them).
    pub findings: Vec<String>,
}

/// Decides recorded events with a candidate set.
pub struct Replayer {
    bundle: PolicyBundle,
    limits: Limits,
    counters: Mutex<MemoryCounters>,
    cards: Option<AgentCards>,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field("bundle", &self.bundle)
            .field("cards", &self.cards)
            .finish()
    }
}

impl Replayer {
    /// A replayer for `bundle`, validating events with `limits`.
    pub fn new(bundle: PolicyBundle, limits: Limits) -> Self {
        Self {
            bundle,
            limits,
            counters: Mutex::default(),
            cards: None,
        }
    }

    /// Checks tool calls' arguments against the input schemas of `cards`
    /// (the agents' cards, as in `mesh-agents`) before deciding them, as
    /// the worker does. Without, no call is checked.
    pub fn with_cards(self, cards: AgentCards) -> Self {
        Self {
            cards: Some(cards),
            ..self
        }
    }

    /// The candidate set.
    pub fn bundle(&self) -> &PolicyBundle {
        &self.bundle
    }

    /// The cards tool calls are checked against, if any.
    pub fn cards(&self) -> Option<&AgentCards> {
        self.cards.as_ref()
    }

    /// Decides a recorded ingress message that arrived on `subject` at
    /// `at` (seconds since the epoch).
    pub fn replay_message(
        &self,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        at: i64,
    ) -> Replayed {
        match MeshEvent::from_message(subject, headers, payload, self.limits) {
            Ok(event) => {
                let step = subjects::parse_ingress(subject).map_or("", |p| p.step);
                self.replay_event(&event, step, at)
            }
            Err(invalid) => Replayed {
                outcome: Outcome::Invalid,
                reasons: Vec::new(),
                errors: vec![invalid.to_string()],
                findings: Vec::new(),
            },
        }
    }

    /// Decides a validated event of ingress step `step` at `at`.
    pub fn replay_event(&self, event: &MeshEvent, step: &str, at: i64) -> Replayed {
        // As in the worker: a call whose arguments break its tool's input
        // schema is invalid and reaches no guardrail (it is not counted) or
        // policy.
        if let Some(cards) = &self.cards
            && let Err(violations) = cards.check(event)
        {
            return Replayed {
                outcome: Outcome::Invalid,
                reasons: vec![INPUT_SCHEMA.to_owned()],
                errors: violations,
                findings: Vec::new(),
            };
        }
        let needs = Needs::of(&[self.bundle.guard()]);
        let mut guards = Guards::default();
        if needs.scan {
            guards.findings = Detector::shared().scan_event(event);
        }
        let mut error = None;
        if needs.count {
            match self.counters.lock() {
                Ok(mut counters) => guards.tallies = counters.add(event, at),
                Err(_) => error = Some("rate and budget counters unavailable: poisoned".to_owned()),
            }
        }
        let evaluation = evaluate(&self.bundle, event, step, &guards, error.as_deref());
        let outcome = match (evaluation.verdict.allowed, evaluation.approval) {
            (true, true) => Outcome::Approval,
            (true, false) => Outcome::Allow,
            (false, _) => Outcome::Deny,
        };
        Replayed {
            outcome,
            reasons: evaluation.verdict.reasons,
            errors: evaluation.verdict.errors,
            findings: guards.findings.names(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// The coder's `code.search` call on itself with `arguments`.
    fn call(arguments: Value) -> MeshEvent {
        crate::guard::tests::tool_call_to(
            "code.search",
            Some("coder"),
            json!({"tool": "code.search", "arguments": arguments}),
        )
    }

    fn cards() -> AgentCards {
        let card = json!({"name": "coder", "tools": [{"name": "code.search", "inputSchema": {
            "type": "object",
            "properties": {"query": {"type": "string", "minLength": 1}},
            "required": ["query"]
        }}]});
        let mut cards = AgentCards::new();
        cards
            .insert("coder", &serde_json::to_vec(&card).unwrap())
            .unwrap();
        cards
    }

    fn replayer() -> Replayer {
        let bundle = PolicyBundle::load(&testkit::shipped_policies()).unwrap();
        Replayer::new(bundle, Limits::default())
    }

    /// With the cards, a call that breaks its tool's input schema replays
    /// as the worker decides it: `invalid`, reason `input-schema`, the
    /// check's violations as errors; one that keeps it is decided by the
    /// policies. Without the cards, nothing is checked.
    #[test]
    fn a_call_that_breaks_its_input_schema_replays_invalid() {
        let bad = call(json!({"query": ""}));
        let violations = cards().check(&bad).unwrap_err();
        assert!(
            violations[0].contains("`code.search` at `/query`"),
            "{violations:?}"
        );

        let checked = replayer().with_cards(cards());
        assert_eq!(
            checked.replay_event(&bad, "tool_call", 0),
            Replayed {
                outcome: Outcome::Invalid,
                reasons: vec![INPUT_SCHEMA.to_owned()],
                errors: violations,
                findings: Vec::new(),
            }
        );
        let good = checked.replay_event(&call(json!({"query": "q"})), "tool_call", 0);
        assert_eq!(good.outcome, Outcome::Allow, "{good:?}");
        assert_eq!(good.reasons, ["members-call-low-risk-tools"]);

        let unchecked = replayer().replay_event(&bad, "tool_call", 0);
        assert_eq!(unchecked.outcome, Outcome::Allow, "{unchecked:?}");
    }

    /// Only a tool call's target's card applies: another agent's card
    /// checks nothing; a card that does not parse is counted and checks
    /// nothing.
    #[test]
    fn only_the_targets_card_applies() {
        let mut others = AgentCards::new();
        let card = json!({"name": "reviewer", "tools": [{"name": "code.search", "inputSchema": {"type": "string"}}]});
        others
            .insert("reviewer", &serde_json::to_vec(&card).unwrap())
            .unwrap();
        assert!(others.check(&call(json!({"query": ""}))).is_ok());
        assert!(others.insert("broken", b"not json").is_err());
        assert_eq!((others.len(), others.unreadable()), (1, 1));
        assert_eq!(others.tools_with_schema(), 1);
    }
}

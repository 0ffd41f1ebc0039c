//! Policy replay: recorded events decided again by a candidate policy set,
//! the way the worker would decide them — validation, payload detectors,
//! rate and budget counters, approval annotations — to compare with the
//! decisions they got.
//!
//! The counters are simulated in memory over the replayed events in the
//! order given, with each event's recorded arrival time as the clock; events
//! before the replayed range are not counted, so counts start low.

use std::sync::Mutex;

use async_nats::HeaderMap;
use schemas::{DecisionReceipt, Limits, MeshEvent, subjects};

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
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field("bundle", &self.bundle)
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
        }
    }

    /// The candidate set.
    pub fn bundle(&self) -> &PolicyBundle {
        &self.bundle
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

//! One policy set's decision on an event with its guardrails applied: what
//! the guard attributes must hold ([`Needs`]), and the verdict with whether
//! the allow waits for a human ([`Evaluation`]). The caller gathers the
//! attributes (the worker from JetStream KV, replay in memory) between the
//! two.

use schemas::MeshEvent;

use crate::guard::{GuardMeta, Guards};
use crate::policy::{PolicyBundle, Verdict};

/// Which guard attributes the policy sets deciding an event read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Scan the payload with the detectors.
    pub scan: bool,
    /// Count the event in the rate and budget counters.
    pub count: bool,
    /// Read the workflow's label record.
    pub flow: bool,
}

impl Needs {
    /// What any of `metas` reads.
    pub fn of(metas: &[&GuardMeta]) -> Self {
        Self {
            scan: metas.iter().any(|m| m.reads_detectors() || m.redacts()),
            flow: metas.iter().any(|m| m.reads_flow()),
            count: metas.iter().any(|m| m.reads_counters()),
        }
    }
}

/// One set's decision on an event, with the guardrails applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The Cedar verdict (denied when the counters failed).
    pub verdict: Verdict,
    /// Whether the allow waits for a human approval.
    pub approval: bool,
    /// On an allow by an `@redact` permit: the classes and kinds whose
    /// spans the delivered copy has replaced (empty: none).
    pub redact: Vec<String>,
}

/// Decides `event` with `bundle` and the prepared guards. `counter_error`
/// says why the counters could not be read: a set that reads them then
/// denies (fail closed).
pub fn evaluate(
    bundle: &PolicyBundle,
    event: &MeshEvent,
    step: &str,
    guards: &Guards,
    counter_error: Option<&str>,
) -> Evaluation {
    let mut verdict = bundle.decide_with(event, step, guards);
    if let Some(error) = counter_error
        && bundle.guard().reads_counters()
    {
        verdict.allowed = false;
        verdict.errors.push(error.to_owned());
    }
    let approval = verdict.allowed && bundle.guard().requires_approval(&verdict.reasons);
    let redact = if verdict.allowed {
        bundle.guard().redaction(&verdict.reasons)
    } else {
        Vec::new()
    };
    Evaluation {
        verdict,
        approval,
        redact,
    }
}

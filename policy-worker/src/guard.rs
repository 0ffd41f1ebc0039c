//! The worker's per-event guardrail hook: computes the guard attributes
//! (payload detectors, the KV counters) once for the active and the shadow
//! set, decides with both through `policy_engine::evaluate`, records the
//! shadow decision on the receipt, and says whether the event waits for a
//! human (`@approval("required")`).

use std::sync::Arc;

use policy_engine::{Detector, Guards, Needs, PolicyBundle, Verdict, evaluate};
use schemas::{Decision, DecisionReceipt, MeshEvent};
use tokio::sync::watch;

use crate::approval::Approvals;
use crate::limits::Counters;

/// The worker's guardrail state: detectors, counters, the shadow set and
/// the approval requests.
pub(crate) struct Runtime {
    detector: &'static Detector,
    counters: Counters,
    shadow: Option<watch::Receiver<Arc<PolicyBundle>>>,
    /// Parks events that wait for a human.
    pub(crate) approvals: Arc<Approvals>,
}

impl Runtime {
    pub(crate) fn new(
        counters: Counters,
        shadow: Option<watch::Receiver<Arc<PolicyBundle>>>,
        approvals: Arc<Approvals>,
    ) -> Self {
        Self {
            detector: Detector::shared(),
            counters,
            shadow,
            approvals,
        }
    }

    /// Decides `event` with the active set (and the shadow set, recorded in
    /// `receipt`), and says whether the allow must wait for an approval.
    pub(crate) async fn decide(
        &self,
        bundle: &PolicyBundle,
        event: &MeshEvent,
        step: &str,
        receipt: &mut DecisionReceipt,
    ) -> (Verdict, bool) {
        let shadow = self.shadow.as_ref().map(|rx| rx.borrow().clone());
        let mut metas = vec![bundle.guard()];
        if let Some(shadow) = &shadow {
            metas.push(shadow.guard());
        }
        let needs = Needs::of(&metas);
        let mut guards = Guards::default();
        if needs.scan {
            guards.findings = self.detector.scan_event(event);
        }
        let mut error = None;
        if needs.count {
            let now = chrono::Utc::now().timestamp();
            match self.counters.add(event, now).await {
                Ok(tallies) => guards.tallies = tallies,
                Err(e) => error = Some(e.to_string()),
            }
        }
        let active = evaluate(bundle, event, step, &guards, error.as_deref());
        if let Some(shadow) = &shadow {
            let s = evaluate(shadow, event, step, &guards, error.as_deref());
            receipt.shadow_decision = Some(if s.verdict.allowed {
                Decision::Allow
            } else {
                Decision::Deny
            });
            receipt.shadow_reasons = s.verdict.reasons;
            receipt.shadow_errors = s.verdict.errors;
            receipt.shadow_policy_hash = Some(shadow.hash().to_owned());
        }
        receipt.findings = guards.findings.names();
        (active.verdict, active.approval)
    }

    /// Records on the receipt of an invalid event (which never reaches
    /// Cedar) that the shadow set, too, would have found it invalid.
    pub(crate) fn mark_invalid(&self, receipt: &mut DecisionReceipt) {
        if let Some(rx) = &self.shadow {
            receipt.shadow_decision = Some(Decision::Invalid);
            receipt.shadow_errors = receipt.errors.clone();
            receipt.shadow_policy_hash = Some(rx.borrow().hash().to_owned());
        }
    }
}

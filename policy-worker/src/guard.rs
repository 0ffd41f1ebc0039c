//! The worker's per-event guardrail hook: computes the guard attributes
//! (payload detectors, the KV counters) once for the active and the shadow
//! set, decides with both through `policy_engine::evaluate`, records the
//! shadow decision on the receipt, and says whether the event waits for a
//! human (`@approval("required")`).

use std::sync::Arc;

use policy_engine::{Detector, Guards, Needs, PolicyBundle, Verdict, evaluate};
use schemas::flows::LabelOrigin;
use schemas::{Decision, DecisionReceipt, MeshEvent};
use tokio::sync::watch;

use crate::approval::Approvals;
use crate::flows::{FlowError, Flows, Seen};
use crate::limits::Counters;

/// The active set's decision with what the worker does about it.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) verdict: Verdict,
    /// The allow waits for a human.
    pub(crate) park: bool,
    /// What an `@redact` allow replaces in the delivered copy.
    pub(crate) redact: Vec<String>,
}

/// The worker's guardrail state: detectors, counters, the shadow set and
/// the approval requests.
pub(crate) struct Runtime {
    detector: &'static Detector,
    counters: Counters,
    flows: Flows,
    shadow: Option<watch::Receiver<Arc<PolicyBundle>>>,
    /// Parks events that wait for a human.
    pub(crate) approvals: Arc<Approvals>,
}

impl Runtime {
    pub(crate) fn new(
        counters: Counters,
        flows: Flows,
        shadow: Option<watch::Receiver<Arc<PolicyBundle>>>,
        approvals: Arc<Approvals>,
    ) -> Self {
        Self {
            detector: Detector::shared(),
            counters,
            flows,
            shadow,
            approvals,
        }
    }

    /// Decides `event` with the active set (and the shadow set, recorded in
    /// `receipt`), says whether the allow must wait for an approval and
    /// what it redacts, and stores the labels an allowed event adds to its
    /// workflow (`Err`: they could not be stored; nothing may be published).
    pub(crate) async fn decide(
        &self,
        bundle: &PolicyBundle,
        event: &MeshEvent,
        step: &str,
        receipt: &mut DecisionReceipt,
    ) -> Result<Outcome, FlowError> {
        let shadow = self.shadow.as_ref().map(|rx| rx.borrow().clone());
        let mut metas = vec![bundle.guard()];
        if let Some(shadow) = &shadow {
            metas.push(shadow.guard());
        }
        let needs = Needs::of(&metas);
        let (guards, error, seen) = self.prepare(bundle, event, needs).await;
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
        if let Some(seen) = seen {
            receipt.labels = seen.state.labels.iter().cloned().collect();
            receipt.labels_lost = seen.state.lost;
            if active.verdict.allowed {
                receipt.labels_added = Box::pin(self.label(bundle, event, seen, receipt)).await?;
            }
        }
        Ok(Outcome {
            verdict: active.verdict,
            park: active.approval,
            redact: active.redact,
        })
    }

    /// The guard attributes the sets need: findings, counters (or why
    /// they failed) and the workflow's record.
    async fn prepare(
        &self,
        bundle: &PolicyBundle,
        event: &MeshEvent,
        needs: Needs,
    ) -> (Guards, Option<String>, Option<Seen>) {
        let mut guards = Guards::default();
        if needs.scan {
            guards.findings = self.detector.scan_event(event);
        }
        let mut error = None;
        if needs.count {
            let now = chrono::Utc::now().timestamp();
            match Box::pin(self.counters.add(event, now)).await {
                Ok(tallies) => guards.tallies = tallies,
                Err(e) => error = Some(e.to_string()),
            }
        }
        let mut seen = None;
        if needs.flow {
            let read = Box::pin(self.flows.read(bundle.flows(), &event.trace.trace_id_hex())).await;
            guards.flow = read.state.clone();
            seen = Some(read);
        }
        (guards, error, seen)
    }

    /// Stores the allowed step and the labels it adds; returns the new ones.
    async fn label(
        &self,
        bundle: &PolicyBundle,
        event: &MeshEvent,
        seen: Seen,
        receipt: &DecisionReceipt,
    ) -> Result<Vec<String>, FlowError> {
        let adds = bundle.flows().adds(event);
        let origin = LabelOrigin {
            event: schemas::subjects::event_key(event.agent.as_str(), event.id()),
            decision_id: receipt.decision_id.clone(),
        };
        let trace = event.trace.trace_id_hex();
        self.flows
            .add(
                bundle.flows(),
                &trace,
                seen,
                &adds,
                &origin,
                bundle.guard().counts_steps(),
            )
            .await
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

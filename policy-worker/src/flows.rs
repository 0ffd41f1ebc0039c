//! Workflow labels in JetStream KV (`mesh-flows`, docs/guardrails.md,
//! "Workflow labels"): each workflow's (trace's) labels and allowed steps,
//! shared by every replica.
//!
//! Before a decision the worker reads the record (one KV read, only when
//! the policy sets keep labels: `flows.toml` declares some or a policy
//! reads `context.workflow`); after an allow it writes the labels the event
//! adds and the step with compare-and-set, re-reading on a conflict, before
//! the event's delivery is published. A record that was purged or deleted
//! (its last entry is a delete marker) is lost: the decision sees every
//! declared label and the record is written back with all of them (fail
//! closed); a read that fails is treated the same way.

use async_nats::jetstream::kv;
use policy_engine::{FlowRules, FlowState};
use schemas::flows::{FlowRecord, LabelOrigin, key};

/// How often a conflicting write is retried before the event is nakked.
const ATTEMPTS: usize = 8;

/// The `mesh-flows` bucket.
pub(crate) struct Flows {
    store: kv::Store,
}

/// A workflow's record as read for one decision.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// What Cedar sees.
    pub(crate) state: FlowState,
    record: FlowRecord,
    /// The revision to write against (0: never written).
    revision: u64,
}

/// Why a workflow's labels could not be stored: the event is not
/// published (nakked and decided again).
#[derive(Debug, thiserror::Error)]
#[error("cannot store the workflow's labels: {0}")]
pub(crate) struct FlowError(String);

impl Flows {
    pub(crate) fn new(store: kv::Store) -> Self {
        Self { store }
    }

    /// The record of workflow `trace` as `rules` see it.
    pub(crate) async fn read(&self, rules: &FlowRules, trace: &str) -> Seen {
        match self.store.entry(key(trace)).await {
            Ok(None) => Seen::of(FlowRecord::default(), 0, rules),
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                match serde_json::from_slice::<FlowRecord>(&entry.value) {
                    Ok(record) => Seen::of(record, entry.revision, rules),
                    Err(error) => {
                        tracing::warn!(%trace, %error, "Workflow label record unreadable; treating it as lost (fail closed).");
                        Seen::lost(rules, entry.revision)
                    }
                }
            }
            Ok(Some(entry)) => {
                tracing::warn!(%trace, "Workflow label record was purged or deleted; treating it as lost (fail closed).");
                Seen::lost(rules, entry.revision)
            }
            Err(error) => {
                tracing::warn!(%trace, %error, "Cannot read the workflow's labels; treating them as lost (fail closed).");
                Seen::lost(rules, u64::MAX)
            }
        }
    }

    /// Records an allowed step of the workflow and the labels it adds
    /// (`origin` names the event and decision); returns the labels that
    /// were new. Conflicting writers (other replicas) are merged.
    pub(crate) async fn add(
        &self,
        rules: &FlowRules,
        trace: &str,
        mut seen: Seen,
        adds: &std::collections::BTreeSet<String>,
        origin: &LabelOrigin,
    ) -> Result<Vec<String>, FlowError> {
        for _ in 0..ATTEMPTS {
            if seen.revision == u64::MAX {
                // The read failed: do not guess a revision, read again.
                seen = self.read(rules, trace).await;
                if seen.revision == u64::MAX {
                    return Err(FlowError("the bucket cannot be read".into()));
                }
            }
            let mut record = seen.record.clone();
            let mut added = Vec::new();
            for label in adds {
                if !record.labels.contains_key(label) {
                    record.labels.insert(label.clone(), origin.clone());
                    added.push(label.clone());
                }
            }
            record.steps += 1;
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| FlowError(e.to_string()))?
                .into();
            let written = if seen.revision == 0 {
                self.store
                    .create(key(trace), bytes)
                    .await
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
                    .map_err(|conflict| (conflict, "create"))
            } else {
                self.store
                    .update(key(trace), bytes, seen.revision)
                    .await
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
                    .map_err(|conflict| (conflict, "update"))
            };
            match written {
                Ok(_) => return Ok(added),
                Err((true, _)) => seen = self.read(rules, trace).await,
                Err((false, op)) => {
                    return Err(FlowError(format!("{op} of `{trace}` failed")));
                }
            }
        }
        Err(FlowError(format!(
            "{ATTEMPTS} conflicting writes on `{trace}`"
        )))
    }
}

impl Seen {
    fn of(record: FlowRecord, revision: u64, rules: &FlowRules) -> Self {
        if record.lost {
            let mut seen = Self::lost(rules, revision);
            seen.record = record;
            seen.state.steps = seen.record.steps;
            return seen;
        }
        let state = FlowState {
            labels: record.labels.keys().cloned().collect(),
            steps: record.steps,
            lost: false,
        };
        Self {
            state,
            record,
            revision,
        }
    }

    /// A lost record: every declared label, written back as such.
    fn lost(rules: &FlowRules, revision: u64) -> Self {
        let state = rules.lost();
        let record = FlowRecord {
            labels: state
                .labels
                .iter()
                .map(|l| (l.clone(), LabelOrigin::default()))
                .collect(),
            steps: 0,
            lost: true,
        };
        Self {
            state,
            record,
            revision,
        }
    }
}

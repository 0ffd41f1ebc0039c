//! Workflow labels in JetStream KV (`mesh-flows`, docs/guardrails.md,
//! "Workflow labels"): each workflow's (trace's) labels and allowed steps,
//! shared by every replica.
//!
//! Before a decision the worker reads the record (one KV read, only when
//! the policy sets keep labels: `flows.toml` declares some or a policy
//! reads `context.workflow`); after an allow that adds a label it writes
//! the labels and the step with compare-and-set, re-reading on a conflict,
//! before the event's delivery is published. An allow that adds no label
//! writes nothing, unless a policy reads `context.workflow.steps` (then
//! every allowed step is written, to be counted). A record that was purged or deleted
//! (its last entry is a delete marker) is lost: the decision sees every
//! declared label and the record is written back with all of them (fail
//! closed); a read that fails is treated the same way. A replica decides
//! the events of one workflow in turn (read to write), so its own
//! concurrent events never conflict; other replicas' are merged.

use std::hash::BuildHasher;
use std::sync::Arc;

use async_nats::jetstream::kv;
use policy_engine::{FlowRules, FlowState};
use schemas::flows::{FlowRecord, LabelOrigin, key};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// A record that no step wrote for this long is written by the next
/// allowed step even when it adds no label, so that it stays `max_age`
/// (at least a day) after the workflow's last step, not its last label.
const REFRESH_SECS: i64 = 3600;

/// How often a conflicting write is retried before the event is nakked.
const ATTEMPTS: usize = 8;

/// Turns: a replica decides the events of one workflow one at a time
/// (read, decide, write), so its own events never conflict and each sees
/// the labels of the one before; workflows share a turn only when their
/// trace ids hash alike.
const TURNS: usize = 1024;

/// The `mesh-flows` bucket.
pub(crate) struct Flows {
    store: kv::Store,
    turns: Vec<Arc<Mutex<()>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// A workflow's record as read for one decision, holding the workflow's
/// turn until it is dropped (after the write, or with a denial).
#[derive(Debug)]
pub(crate) struct Seen {
    /// What Cedar sees.
    pub(crate) state: FlowState,
    record: FlowRecord,
    /// The revision to write against (0: never written).
    revision: u64,
    /// When that revision was written (Unix seconds; 0: never).
    written: i64,
    turn: Option<OwnedMutexGuard<()>>,
}

/// Why a workflow's labels could not be stored: the event is not
/// published (nakked and decided again).
#[derive(Debug, thiserror::Error)]
#[error("cannot store the workflow's labels: {0}")]
pub(crate) struct FlowError(String);

impl Flows {
    pub(crate) fn new(store: kv::Store) -> Self {
        Self {
            store,
            turns: (0..TURNS).map(|_| Arc::new(Mutex::new(()))).collect(),
            hasher: Default::default(),
        }
    }

    /// The record of workflow `trace` as `rules` see it, once it is this
    /// event's turn in the workflow.
    pub(crate) async fn read(&self, rules: &FlowRules, trace: &str) -> Seen {
        let turn = self.turns[self.hasher.hash_one(trace) as usize % TURNS].clone();
        let turn = turn.lock_owned().await;
        let mut seen = self.fetch(rules, trace).await;
        seen.turn = Some(turn);
        seen
    }

    async fn fetch(&self, rules: &FlowRules, trace: &str) -> Seen {
        match self.store.entry(key(trace)).await {
            Ok(None) => Seen::of(FlowRecord::default(), 0, rules),
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                match serde_json::from_slice::<FlowRecord>(&entry.value) {
                    Ok(record) => {
                        let mut seen = Seen::of(record, entry.revision, rules);
                        seen.written = entry.created.unix_timestamp();
                        seen
                    }
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
        count_steps: bool,
    ) -> Result<Vec<String>, FlowError> {
        // Nothing to store: no new label, no step count a policy reads, and
        // a record that is not lost (a lost one is written back as such).
        if !count_steps
            && !seen.record.lost
            && seen.revision != u64::MAX
            && (seen.revision == 0 || chrono::Utc::now().timestamp() - seen.written < REFRESH_SECS)
            && adds.iter().all(|l| seen.record.labels.contains_key(l))
        {
            return Ok(Vec::new());
        }
        for _ in 0..ATTEMPTS {
            if seen.revision == u64::MAX {
                // The read failed: do not guess a revision, read again.
                seen = self.refetch(rules, trace, seen).await;
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
            match self.put(trace, bytes, seen.revision).await {
                Ok(()) => return Ok(added),
                // Another replica wrote: merge into what it wrote.
                Err((true, _)) => seen = self.refetch(rules, trace, seen).await,
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

impl Flows {
    /// Writes `trace`'s record over `revision` (creates it at 0): a
    /// conflict (another replica wrote first) is `Err((true, op))`.
    async fn put(
        &self,
        trace: &str,
        bytes: bytes::Bytes,
        revision: u64,
    ) -> Result<(), (bool, &'static str)> {
        if revision == 0 {
            self.store
                .create(key(trace), bytes)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, "create"))
        } else {
            self.store
                .update(key(trace), bytes, revision)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, "update"))
        }
    }

    /// Reads the record again, keeping the turn.
    async fn refetch(&self, rules: &FlowRules, trace: &str, mut old: Seen) -> Seen {
        let turn = old.turn.take();
        let mut seen = self.fetch(rules, trace).await;
        seen.turn = turn;
        seen
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
            written: 0,
            turn: None,
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
            written: 0,
            turn: None,
        }
    }
}

//! Rate limits and budgets kept by the worker: per-agent event counts in
//! clock-aligned windows (minute, hour, UTC day), tokens and cost an agent
//! reported today, and per-workflow totals — what `policy_engine::Tallies`
//! exposes to Cedar as `context.rate` and `context.budget`.
//!
//! The counters live in the JetStream KV bucket `mesh-limits` (one JSON value
//! per agent, `agent.<agent>`, and per workflow, `workflow.<trace id>`), so
//! they survive a restart and are shared by every worker replica. Each
//! update is a compare-and-set on the key's revision: a replica whose
//! revision is stale re-reads and re-applies, so no increment is lost and
//! every event sees a distinct count. Events of one key that arrive while an
//! update is in flight are folded into the next update (one round trip for
//! the whole batch), so a busy agent costs one KV write per batch, not per
//! event.
//!
//! Accuracy: every valid event is counted once before it is decided (denied
//! ones too: an agent that keeps sending stays throttled until the window
//! rolls). An event redelivered after it was counted (a worker crash, a
//! failed publish or ack, or the ack wait exceeded) is counted again, so
//! counts can run high by such redeliveries, never low. Windows are fixed: an agent can send up to twice a
//! per-minute limit across a minute boundary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use policy_engine::Tallies;
use schemas::limits::{AgentTally, Usage, WorkflowTally, agent_key, workflow_key};
use schemas::{EventType, MeshEvent};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

/// Why the counters could not be updated; the event is denied (fail closed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate and budget counters unavailable: {0}")]
pub(crate) struct CounterError(String);

/// The rate and budget counters in the `mesh-limits` bucket: shared by
/// the worker's replicas, durable.
pub(crate) struct Counters {
    agents: Arc<Cells<AgentTally>>,
    workflows: Arc<Cells<WorkflowTally>>,
}

impl Counters {
    /// Counters in `bucket`.
    pub(crate) fn kv(store: kv::Store) -> Self {
        Self {
            agents: Arc::new(Cells::new(store.clone())),
            workflows: Arc::new(Cells::new(store)),
        }
    }

    /// Counts `event` at `now` (seconds since the epoch) and returns what it sees.
    pub(crate) async fn add(&self, event: &MeshEvent, now: i64) -> Result<Tallies, CounterError> {
        let usage = Usage::of_event(event);
        let tool_call = event.event_type == EventType::ToolCall;
        let trace_id = event.trace.trace_id_hex();
        let (agent, workflow) = tokio::join!(
            self.agents
                .add(agent_key(event.agent.as_str()), (now, usage)),
            self.workflows
                .add(workflow_key(&trace_id), (tool_call, usage)),
        );
        Ok(Tallies {
            usage,
            agent: agent?,
            workflow: workflow?,
        })
    }
}

/// A counter value that knows how to count.
pub(crate) trait Tally:
    Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static
{
    type Delta: Copy + Send + 'static;
    type Seen: Send + 'static;
    fn apply(&mut self, delta: Self::Delta) -> Self::Seen;
}

impl Tally for AgentTally {
    type Delta = (i64, Usage);
    type Seen = AgentTally;
    fn apply(&mut self, (now, usage): Self::Delta) -> AgentTally {
        self.add(now, usage)
    }
}

impl Tally for WorkflowTally {
    type Delta = (bool, Usage);
    type Seen = WorkflowTally;
    fn apply(&mut self, (tool_call, usage): Self::Delta) -> WorkflowTally {
        self.add(tool_call, usage)
    }
}

/// How many times one batch retries after losing a compare-and-set race.
const MAX_CONFLICTS: usize = 64;
/// Slots kept for their cached revision before idle ones are dropped.
const MAX_SLOTS: usize = 10_000;

type Waiter<T> = (
    <T as Tally>::Delta,
    oneshot::Sender<Result<<T as Tally>::Seen, CounterError>>,
);

/// KV-backed counters of one kind, with one slot per key.
pub(crate) struct Cells<T: Tally> {
    store: kv::Store,
    slots: Mutex<HashMap<String, Arc<Mutex<Slot<T>>>>>,
}

struct Slot<T: Tally> {
    /// Increments waiting for the next write.
    pending: Vec<Waiter<T>>,
    /// Whether a task is writing this key.
    running: bool,
    /// The last value written or read, with its revision.
    cached: Option<(u64, T)>,
}

impl<T: Tally> Cells<T> {
    fn new(store: kv::Store) -> Self {
        Self {
            store,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &str) -> Result<Arc<Mutex<Slot<T>>>, CounterError> {
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| CounterError("poisoned".into()))?;
        if let Some(slot) = slots.get(key) {
            return Ok(slot.clone());
        }
        if slots.len() >= MAX_SLOTS {
            slots.retain(|_, s| s.lock().map(|s| s.running).unwrap_or(false));
        }
        let slot = Arc::new(Mutex::new(Slot {
            pending: Vec::new(),
            running: false,
            cached: None,
        }));
        slots.insert(key.to_owned(), slot.clone());
        Ok(slot)
    }

    /// Adds `delta` to `key`; resolves once the write holding it is stored.
    async fn add(self: &Arc<Self>, key: String, delta: T::Delta) -> Result<T::Seen, CounterError> {
        let slot = self.slot(&key)?;
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut s = slot.lock().map_err(|_| CounterError("poisoned".into()))?;
            s.pending.push((delta, tx));
            !std::mem::replace(&mut s.running, true)
        };
        if lead {
            tokio::spawn(drain(self.store.clone(), key, slot));
        }
        rx.await
            .map_err(|_| CounterError("counter task stopped".into()))?
    }
}

/// Writes the pending increments of one key, batch after batch, until none
/// are left.
async fn drain<T: Tally>(store: kv::Store, key: String, slot: Arc<Mutex<Slot<T>>>) {
    loop {
        let (batch, mut cached) = {
            let Ok(mut s) = slot.lock() else { return };
            if s.pending.is_empty() {
                s.running = false;
                return;
            }
            (std::mem::take(&mut s.pending), s.cached.take())
        };
        let mut conflicts = 0;
        let result = loop {
            let (revision, base) = match cached.take() {
                Some(c) => c,
                None => match read::<T>(&store, &key).await {
                    Ok(c) => c,
                    Err(e) => break Err(e),
                },
            };
            let mut next = base;
            let seen: Vec<T::Seen> = batch.iter().map(|(d, _)| next.apply(*d)).collect();
            match write(&store, &key, &next, revision).await {
                Ok(revision) => break Ok((revision, next, seen)),
                Err(Write::Conflict) if conflicts < MAX_CONFLICTS => conflicts += 1,
                Err(Write::Conflict) => {
                    break Err(CounterError(format!(
                        "key `{key}`: {MAX_CONFLICTS} compare-and-set conflicts in a row"
                    )));
                }
                Err(Write::Failed(e)) => break Err(e),
            }
        };
        match result {
            Ok((revision, value, seen)) => {
                if let Ok(mut s) = slot.lock() {
                    s.cached = Some((revision, value));
                }
                for ((_, tx), seen) in batch.into_iter().zip(seen) {
                    let _ = tx.send(Ok(seen));
                }
            }
            Err(error) => {
                tracing::warn!(%key, %error, "Counter update failed; the events are denied.");
                for (_, tx) in batch {
                    let _ = tx.send(Err(error.clone()));
                }
            }
        }
    }
}

/// The current value and revision of `key` (revision 0: never written).
async fn read<T: Tally>(store: &kv::Store, key: &str) -> Result<(u64, T), CounterError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| CounterError(format!("reading `{key}`: {e}")))?;
    Ok(match entry {
        None => (0, T::default()),
        Some(entry) if entry.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&entry.value).unwrap_or_else(|error| {
                tracing::warn!(%key, %error, "Counter value unreadable; starting it again.");
                T::default()
            });
            (entry.revision, value)
        }
        // Deleted or purged (`meshctl limits reset`): start from zero.
        Some(entry) => (entry.revision, T::default()),
    })
}

enum Write {
    Conflict,
    Failed(CounterError),
}

async fn write<T: Tally>(
    store: &kv::Store,
    key: &str,
    value: &T,
    revision: u64,
) -> Result<u64, Write> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| Write::Failed(CounterError(e.to_string())))?
        .into();
    if revision == 0 {
        store.create(key, bytes).await.map_err(|e| match e.kind() {
            kv::CreateErrorKind::AlreadyExists => Write::Conflict,
            _ => Write::Failed(CounterError(format!("creating `{key}`: {e}"))),
        })
    } else {
        store
            .update(key, bytes, revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => Write::Conflict,
                _ => Write::Failed(CounterError(format!("updating `{key}`: {e}"))),
            })
    }
}

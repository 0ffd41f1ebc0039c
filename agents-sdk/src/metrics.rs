//! What an agent is doing, as numbers: messages read ahead, handlers and
//! tools running, deliveries handled, retried and given up on
//! ([`Agent::metrics`](crate::Agent::metrics)), and what still waits at the broker
//! ([`Agent::pending`](crate::Agent::pending)).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The counters an agent keeps; [`AgentMetrics`] is a copy of them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) buffered_deliveries: Arc<AtomicUsize>,
    pub(crate) buffered_calls: Arc<AtomicUsize>,
    pub(crate) handlers_running: AtomicUsize,
    pub(crate) tools_running: AtomicUsize,
    pub(crate) handled: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) tool_calls: AtomicU64,
    pub(crate) refused: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a running handler or tool while alive.
pub(crate) struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    pub(crate) fn start(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of an agent's counters (this process only, since it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct AgentMetrics {
    /// Deliveries pulled ahead and not yet handed to a handler.
    pub buffered_deliveries: usize,
    /// Tool calls pulled ahead and waiting for a free tool slot.
    pub buffered_calls: usize,
    /// Delivery handlers running now (`serve_with`).
    pub handlers_running: usize,
    /// Tool handlers running now.
    pub tools_running: usize,
    /// Deliveries a handler finished and that were acknowledged.
    pub handled: u64,
    /// Failed attempts that were refused to be delivered again.
    pub retries: u64,
    /// Deliveries given up on after their last attempt (each reported by
    /// a give-up observation).
    pub gave_up: u64,
    /// Deliveries that were not valid mesh events, terminated at once.
    pub invalid: u64,
    /// Tool calls answered (with a result or an error).
    pub tool_calls: u64,
    /// Deliveries refused because their decision signature did not verify
    /// (acknowledged, never handed to a handler).
    pub refused: u64,
}

/// What waits for an agent at the broker: its durables' counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Pending {
    /// Deliveries not yet pulled from `agent-<id>` on `MESH_DELIVER`.
    pub deliveries: u64,
    /// Deliveries pulled and not yet acknowledged.
    pub deliveries_unacked: usize,
    /// Tool calls not yet pulled from `agent-<id>` on `MESH_CALL` (0 when
    /// the mesh has no `MESH_CALL`).
    pub calls: u64,
    /// Tool calls pulled and not yet acknowledged.
    pub calls_unacked: usize,
}

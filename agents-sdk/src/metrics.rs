//! What an agent is doing, as numbers: messages read ahead, handlers and
//! tools running, deliveries handled, retried and given up on
//! ([`Agent::metrics`]), and what still waits at the broker
//! ([`Agent::pending`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_nats::jetstream::consumer::PullConsumer;
use schemas::subjects;

use crate::agent::Agent;
use crate::error::{DeliveryError, DeliveryErrorKind};

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

impl Agent {
    /// A snapshot of this agent's counters: its queue in this process,
    /// running handlers and tools, retries and give-ups.
    pub fn metrics(&self) -> AgentMetrics {
        let c = &self.inner.counters;
        AgentMetrics {
            buffered_deliveries: c.buffered_deliveries.load(Ordering::Relaxed),
            buffered_calls: c.buffered_calls.load(Ordering::Relaxed),
            handlers_running: c.handlers_running.load(Ordering::Relaxed),
            tools_running: c.tools_running.load(Ordering::Relaxed),
            handled: c.handled.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            gave_up: c.gave_up.load(Ordering::Relaxed),
            invalid: c.invalid.load(Ordering::Relaxed),
            tool_calls: c.tool_calls.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }

    /// What waits for this agent at the broker (one JetStream request per
    /// durable).
    pub async fn pending(&self) -> Result<Pending, DeliveryError> {
        async fn counts(
            consumer: &PullConsumer,
            name: &str,
        ) -> Result<(u64, usize), DeliveryError> {
            let mut consumer = consumer.clone();
            let info = consumer.info().await.map_err(|e| {
                DeliveryError::with_source(DeliveryErrorKind::Pull(name.to_owned()), e)
            })?;
            Ok((info.num_pending, info.num_ack_pending))
        }
        let name = &self.inner.consumer_name;
        let (deliveries, deliveries_unacked) = counts(&self.inner.consumer, name).await?;
        let (calls, calls_unacked) = match &self.inner.calls {
            Some(calls) => counts(calls, &format!("{}/{name}", subjects::STREAM_CALL)).await?,
            None => (0, 0),
        };
        Ok(Pending {
            deliveries,
            deliveries_unacked,
            calls,
            calls_unacked,
        })
    }
}

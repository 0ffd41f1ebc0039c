//! Lease CloudEvents on `mesh.gpu.lease.<pool>`: one per grant and per
//! release, binary mode, published with JetStream and kept until the stream
//! acknowledges them (the audit sink stores them into `gpu_leases`).
//!
//! The KV write is the decision; the event reports it. An event the broker
//! does not take stays in the [`Outbox`] and is sent again, in order, with
//! the same id (`Nats-Msg-Id`), so a retry is never stored twice.

use std::collections::VecDeque;

use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};

use schemas::{AttributesReader, EventBuilder};

use gpu_pools::Lease;
use gpu_pools::decide::ReleaseReason;

/// CloudEvents `type` of a grant ([`schemas::gpu::LEASE_GRANTED`]).
pub use schemas::gpu::LEASE_GRANTED as TYPE_GRANTED;
/// CloudEvents `type` of a release ([`schemas::gpu::LEASE_RELEASED`]).
pub use schemas::gpu::LEASE_RELEASED as TYPE_RELEASED;
pub use schemas::gpu::LeaseEventData;

/// Most events kept while the broker does not take them; the oldest go first.
const OUTBOX_LIMIT: usize = 10_000;

/// Whether a lease was granted or released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// A new lease.
    Granted,
    /// A lease ended, for this reason.
    Released(ReleaseReason),
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The CloudEvent for `action` on `lease`, from scaler `instance`; an error
/// only for an instance name that is not a valid URI path segment.
pub fn lease_event(
    instance: &str,
    action: LeaseAction,
    lease: &Lease,
    now: DateTime<Utc>,
) -> Result<schemas::Event, String> {
    let (ty, reason) = match action {
        LeaseAction::Granted => (TYPE_GRANTED, None),
        LeaseAction::Released(r) => (TYPE_RELEASED, Some(r.as_str().to_owned())),
    };
    let data = LeaseEventData {
        pool: lease.pool.clone(),
        gpu: lease.gpu.clone(),
        holder: lease.holder.clone(),
        expires_at: rfc3339(lease.expires_at),
        granted_at: rfc3339(lease.granted_at),
        reason,
    };
    // INVARIANT: every field is a string, so this cannot fail.
    let json = serde_json::to_value(&data).unwrap_or_default();
    schemas::EventBuilderV10::new()
        .id(uuid::Uuid::now_v7().to_string())
        .source(format!("/gpu-scaler/{instance}"))
        .ty(ty)
        .subject(lease.gpu.clone())
        .time(rfc3339(now))
        .data("application/json", json)
        .build()
        .map_err(|e| e.to_string())
}

/// Lease events not yet acknowledged by JetStream, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<(String, schemas::Event)>,
}

impl Outbox {
    /// Queues `event` for `pool`.
    pub fn push(&mut self, pool: &str, event: schemas::Event) {
        if self.queue.len() >= OUTBOX_LIMIT {
            tracing::error!(
                limit = OUTBOX_LIMIT,
                "Lease event outbox full; dropping the oldest event."
            );
            self.queue.pop_front();
        }
        self.queue
            .push_back((schemas::subjects::gpu_lease(pool), event));
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Publishes the waiting events in order until one is not acknowledged;
    /// returns how many were.
    pub async fn flush(&mut self, js: &jetstream::Context) -> usize {
        let mut sent = 0;
        while let Some((subject, event)) = self.queue.front() {
            let (mut headers, payload) = schemas::encode_binary(event);
            headers.insert("Nats-Msg-Id", event.id());
            let result = match js
                .publish_with_headers(subject.clone(), headers, payload)
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => {
                    self.queue.pop_front();
                    sent += 1;
                }
                Err(e) => {
                    tracing::warn!(%subject, error = %e, waiting = self.queue.len(), "Lease event not acknowledged; will retry.");
                    break;
                }
            }
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let t = Utc::now();
        let lease = Lease {
            pool: "coder".into(),
            gpu: "GPU-1".into(),
            holder: "a".into(),
            granted_at: t,
            expires_at: t,
        };
        let e = lease_event(
            "a",
            LeaseAction::Released(ReleaseReason::Expired),
            &lease,
            t,
        )
        .unwrap();
        assert_eq!(e.ty(), TYPE_RELEASED);
        assert_eq!(e.source().to_string(), "/gpu-scaler/a");
        let (headers, payload) = schemas::encode_binary(&e);
        assert_eq!(headers.get("ce-type").unwrap().as_str(), TYPE_RELEASED);
        let data: LeaseEventData = serde_json::from_slice(&payload).unwrap();
        assert_eq!(data.pool, "coder");
        assert_eq!(data.reason.as_deref(), Some("expired"));
        let (decoded, _) = schemas::decode(Some(&headers), &payload).unwrap();
        assert_eq!(decoded.id(), e.id());
    }
}

//! A pool's demand: the backlog of the JetStream consumers that feed it,
//! `num_pending + num_ack_pending` summed over them, as KEDA's NATS JetStream
//! scaler measures it.
//!
//! A consumer feeds a pool when the pool names it, or when every one of its
//! filter subjects lies within one of the pool's subject patterns (a consumer
//! on `mesh.deliver.coder.planner` lies within `mesh.deliver.coder.>`).

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::config::PoolConfig;

/// The backlog of one consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerBacklog {
    /// The stream it reads.
    pub stream: String,
    /// The consumer name.
    pub name: String,
    /// Messages not yet delivered to it.
    pub num_pending: u64,
    /// Messages delivered and not yet acknowledged.
    pub num_ack_pending: u64,
}

/// The demand of one pool at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDemand {
    /// Sum of pending and ack pending over the matching consumers.
    pub backlog: u64,
    /// The consumers that made it up.
    pub consumers: Vec<ConsumerBacklog>,
    /// Consumers the pool names that do not exist (yet).
    pub missing: Vec<String>,
}

/// Why demand could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("reading the consumers of stream `{stream}`: {source}")]
pub struct DemandError {
    /// The stream.
    pub stream: String,
    /// The broker's answer (shared by the pools of the stream).
    pub source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

/// Reads the demand of every pool: one consumer listing per stream the pools
/// use. A pool whose stream cannot be read gets an error, the others a value.
pub async fn read_demand(
    js: &jetstream::Context,
    pools: &BTreeMap<String, PoolConfig>,
) -> BTreeMap<String, Result<PoolDemand, DemandError>> {
    let streams: BTreeSet<&str> = pools.values().map(|p| p.stream.as_str()).collect();
    let mut listings = BTreeMap::new();
    for stream in streams {
        listings.insert(stream, list_consumers(js, stream).await);
    }
    pools
        .iter()
        .map(|(name, pool)| {
            let demand = match &listings[pool.stream.as_str()] {
                Ok(consumers) => Ok(pool_demand(pool, consumers)),
                Err(e) => Err(e.clone()),
            };
            (name.clone(), demand)
        })
        .collect()
}

async fn list_consumers(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<jetstream::consumer::Info>, DemandError> {
    let err = |e: async_nats::Error| DemandError {
        stream: stream.to_owned(),
        source: e.into(),
    };
    let handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| err(e.into()))?;
    handle
        .consumers()
        .try_collect()
        .await
        .map_err(|e| err(e.into()))
}

/// The demand of `pool` given the consumers of its stream.
pub fn pool_demand(pool: &PoolConfig, consumers: &[jetstream::consumer::Info]) -> PoolDemand {
    let mut demand = PoolDemand::default();
    for info in consumers {
        let named = pool.consumers.contains(&info.name);
        // Matching by subject counts durable consumers only: ephemeral ones
        // (ordered consumers of an agent's inbox, `nats` CLI inspections)
        // see the same messages without being work that waits for a GPU.
        let by_subject = info.config.durable_name.is_some()
            && !info.config.filter_subject.is_empty()
            && pool
                .subjects
                .iter()
                .any(|pattern| subject_within(&info.config.filter_subject, pattern));
        if named || by_subject {
            let ack_pending = info.num_ack_pending as u64;
            demand.backlog = demand
                .backlog
                .saturating_add(info.num_pending)
                .saturating_add(ack_pending);
            demand.consumers.push(ConsumerBacklog {
                stream: info.stream_name.clone(),
                name: info.name.clone(),
                num_pending: info.num_pending,
                num_ack_pending: ack_pending,
            });
        }
    }
    demand.missing = pool
        .consumers
        .iter()
        .filter(|n| !consumers.iter().any(|c| c.name == **n))
        .cloned()
        .collect();
    demand
}

/// Whether every subject matched by `filter` is matched by `pattern`
/// (both NATS subjects, `*` one token, `>` the rest).
pub fn subject_within(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('.');
    let mut p = pattern.split('.');
    loop {
        match (f.next(), p.next()) {
            (None, None) => return true,
            // `>` in the pattern covers one or more remaining tokens.
            (Some(_), Some(">")) => return true,
            // `>` in the filter reaches further than any non-`>` pattern token.
            (Some(">"), Some(_)) => return false,
            (Some(_), Some("*")) => {}
            (Some(ft), Some(pt)) if ft == pt && ft != "*" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, durable: bool, pending: u64) -> jetstream::consumer::Info {
        let mut config = serde_json::json!({
            "filter_subject": "mesh.deliver.coder.>",
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "replay_policy": "instant",
        });
        if durable {
            config["durable_name"] = name.into();
        }
        serde_json::from_value(serde_json::json!({
            "type": "io.nats.jetstream.api.v1.consumer_info_response",
            "stream_name": "MESH_DELIVER",
            "name": name,
            "created": "2026-01-01T00:00:00Z",
            "config": config,
            "delivered": {"consumer_seq": 0, "stream_seq": 0},
            "ack_floor": {"consumer_seq": 0, "stream_seq": 0},
            "num_ack_pending": 0,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": pending,
        }))
        .unwrap()
    }

    #[test]
    fn subject_match_counts_durable_consumers_only() {
        let pool: PoolConfig = toml::from_str(
            "subjects = [\"mesh.deliver.coder.>\"]\ntarget_backlog_per_gpu = 10\nmax_gpus = 3\n",
        )
        .unwrap();
        let demand = pool_demand(
            &pool,
            &[info("agent-coder", true, 25), info("inbox", false, 25)],
        );
        assert_eq!(demand.backlog, 25);
        assert_eq!(demand.consumers.len(), 1);
        assert_eq!(demand.consumers[0].name, "agent-coder");
    }

    #[test]
    fn within() {
        assert!(subject_within(
            "mesh.deliver.coder.planner",
            "mesh.deliver.coder.>"
        ));
        assert!(subject_within(
            "mesh.deliver.coder.>",
            "mesh.deliver.coder.>"
        ));
        assert!(subject_within(
            "mesh.deliver.coder.*",
            "mesh.deliver.coder.>"
        ));
        assert!(subject_within("mesh.deliver.coder.*", "mesh.deliver.*.*"));
        assert!(subject_within("mesh.deliver.coder.x", "mesh.deliver.*.x"));
        assert!(!subject_within(
            "mesh.deliver.coder",
            "mesh.deliver.coder.>"
        ));
        assert!(!subject_within("mesh.deliver.>", "mesh.deliver.coder.>"));
        assert!(!subject_within("mesh.deliver.*.x", "mesh.deliver.coder.x"));
        assert!(!subject_within(
            "mesh.deliver.reviewer.x",
            "mesh.deliver.coder.>"
        ));
        assert!(!subject_within(
            "mesh.deliver.coder.x.y",
            "mesh.deliver.coder.*"
        ));
        assert!(!subject_within(
            "mesh.deliver.coder.>",
            "mesh.deliver.coder.*"
        ));
        assert!(subject_within("a.b", "a.b"));
        assert!(subject_within("a.b", ">"));
    }
}

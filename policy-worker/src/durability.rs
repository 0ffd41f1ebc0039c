//! What the NATS nodes promise about an acknowledged event: read from each
//! node's monitoring endpoint (`/varz`, `jetstream.config.sync_always`) at
//! start, exposed as the `agentmesh_nats_sync_always` gauge (per node) and
//! a warning for every node that does not fsync each write.

use std::time::Duration;

use broker_config::server::{NodeSync, read_node_sync};

/// How long one node's `/varz` may take to answer.
const VARZ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads each node's durability from `urls` (`http://host:port`), records
/// it on `gauge` and logs it; returns what it read (a node that did not
/// answer is logged and left out).
pub(crate) async fn report(urls: &[String], gauge: &telemetry::NatsDurability) -> Vec<NodeSync> {
    if urls.is_empty() {
        tracing::info!(
            "NATS durability not checked: pass --nats-monitoring-url (NATS_MONITORING_URL) to report whether each node fsyncs every write."
        );
        return Vec::new();
    }
    let mut nodes = Vec::new();
    for url in urls {
        match read_node_sync(url, VARZ_TIMEOUT).await {
            Ok(node) => {
                gauge.record(&node.server_name, node.sync_always);
                if node.sync_always {
                    tracing::info!(server = %node.server_name, version = %node.version, %url, sync = "always", "NATS node fsyncs every write before acknowledging it.");
                } else {
                    tracing::warn!(server = %node.server_name, version = %node.version, %url, sync = %node.describe(), "NATS node does not fsync each write: an OS crash or power cut of it loses events it acknowledged since its last flush; run it with `jetstream {{ sync_interval: always }}` (meshctl up --durability always).");
                }
                nodes.push(node);
            }
            Err(error) => {
                tracing::warn!(%url, %error, "NATS node's durability unknown: its monitoring endpoint did not answer.");
            }
        }
    }
    nodes
}

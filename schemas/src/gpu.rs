//! GPU leases on the wire: the value of a key of the KV bucket
//! `mesh-gpu-leases` (key = the GPU uuid, a delete marker when the GPU is
//! free). The GPU scaler writes them; GPU workers read them
//! (`gpu_scaler::watch_pool`). And the lease events on
//! `mesh.gpu.lease.<pool>`: their types and data, which the scaler
//! publishes and the audit sink stores in `gpu_leases`. See
//! `docs/gpu-scaler.md`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// CloudEvents `type` of a lease grant, on `mesh.gpu.lease.<pool>`.
pub const LEASE_GRANTED: &str = "io.agentmesh.gpu.lease.granted";
/// CloudEvents `type` of a lease release.
pub const LEASE_RELEASED: &str = "io.agentmesh.gpu.lease.released";

/// The JSON `data` of a lease event (`LEASE_GRANTED`, `LEASE_RELEASED`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEventData {
    /// The pool.
    pub pool: String,
    /// The GPU uuid.
    pub gpu: String,
    /// The scaler instance holding (or, for a release, that held) the lease.
    pub holder: String,
    /// The lease's expiry (RFC 3339).
    pub expires_at: String,
    /// When the lease was granted (RFC 3339).
    pub granted_at: String,
    /// For a release: why (`demand`, `fair-share`, `expired`, `unhealthy`, `gone`, `pool-removed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One lease: which pool may use the GPU, who granted it, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The pool the GPU is leased to.
    pub pool: String,
    /// The GPU uuid (also the key).
    pub gpu: String,
    /// The scaler instance that granted it and renews it.
    pub holder: String,
    /// When it was granted (RFC 3339).
    #[serde(with = "rfc3339")]
    pub granted_at: DateTime<Utc>,
    /// When it lapses unless renewed (RFC 3339).
    #[serde(with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// Whether the lease still holds at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

/// RFC 3339 with microseconds and `Z`, the form every agentmesh time uses.
pub(crate) mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(value: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&value.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| D::Error::custom(format!("`{text}` is not an RFC 3339 time: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_json() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let lease = Lease {
            pool: "coder".into(),
            gpu: "GPU-1".into(),
            holder: "a".into(),
            granted_at: t,
            expires_at: t + chrono::Duration::seconds(15),
        };
        let json = serde_json::to_string(&lease).unwrap();
        assert_eq!(
            json,
            r#"{"pool":"coder","gpu":"GPU-1","holder":"a","granted_at":"2026-01-02T03:04:05.123456Z","expires_at":"2026-01-02T03:04:20.123456Z"}"#
        );
        assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), lease);
        assert!(lease.is_live(t));
        assert!(!lease.is_live(t + chrono::Duration::seconds(15)));
    }
}

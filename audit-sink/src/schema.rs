//! The audit tables of `DESIGN.md` (database `agentmesh` by default) and the
//! one idempotent function that creates them.
//!
//! The DDL runs on ClickHouse 18.16 (what Debian ships and the tests use) and
//! on current servers. Features newer than 18.16 are used only where
//! `SELECT version()` says the server has them: `LowCardinality` for the
//! low-cardinality columns and `TTL` retention.
//!
//! Every table is a `ReplacingMergeTree` whose sorting key ends in the row's
//! identity (the event id, plus `msg_key` for messages that carry no id), so
//! the duplicates that at-least-once delivery produces collapse: the shipped
//! queries read with `FINAL`.

use clickhouse::Client;

/// The database the audit tables live in unless configured otherwise.
pub const DEFAULT_DATABASE: &str = "agentmesh";

/// Table of every ingress event.
pub const EVENTS: &str = "events";
/// Table of every decision receipt.
pub const DECISIONS: &str = "decisions";
/// Table of GPU lease grants and releases.
pub const GPU_LEASES: &str = "gpu_leases";

/// What the connected server supports, from `SELECT version()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFeatures {
    /// The version string, e.g. `18.16.1`.
    pub version: String,
    /// `LowCardinality(String)` without an experimental setting (20.1+).
    pub low_cardinality: bool,
    /// Table `TTL` expressions (20.1+).
    pub ttl: bool,
}

impl ServerFeatures {
    /// Features of a server reporting `version`.
    pub fn from_version(version: &str) -> Self {
        let mut parts = version
            .trim()
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        // Both exist earlier (LowCardinality behind a setting in 18.x, TTL
        // from 19.6); 20.1 is where both are plain, stable syntax.
        let modern = (major, minor) >= (20, 1);
        Self {
            version: version.trim().to_owned(),
            low_cardinality: modern,
            ttl: modern,
        }
    }

    /// Asks the server.
    pub async fn detect(client: &Client) -> Result<Self, clickhouse::error::Error> {
        let version: String = client.query("SELECT version()").fetch_one().await?;
        Ok(Self::from_version(&version))
    }
}

/// Why a database name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("database name `{0}` is invalid: use letters, digits and `_`, not starting with a digit")]
pub struct InvalidDatabase(pub String);

/// Checks that `name` is a plain identifier (it is interpolated into DDL).
pub fn check_database(name: &str) -> Result<(), InvalidDatabase> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(InvalidDatabase(name.to_owned()))
    }
}

fn low_cardinality(features: &ServerFeatures) -> &'static str {
    if features.low_cardinality {
        "LowCardinality(String)"
    } else {
        "String"
    }
}

/// Columns of `decisions` added after its first release (guardrails):
/// created with the table, and added to an existing table by [`ensure`].
/// Every one defaults to empty, which is what a receipt without the field
/// means.
pub fn decision_guard_columns(features: &ServerFeatures) -> Vec<(&'static str, String)> {
    let lc = low_cardinality(features);
    vec![
        ("findings", "Array(String)".to_owned()),
        ("shadow_decision", lc.to_owned()),
        ("shadow_reasons", "Array(String)".to_owned()),
        ("shadow_errors", "Array(String)".to_owned()),
        ("shadow_policy_hash", lc.to_owned()),
        ("approval_id", "String".to_owned()),
        ("approval_status", lc.to_owned()),
        ("approver", "String".to_owned()),
        ("approval_comment", "String".to_owned()),
    ]
}

/// The statements that create the database and the three tables.
pub fn ddl(database: &str, features: &ServerFeatures, retention_days: u32) -> Vec<String> {
    let lc = low_cardinality(features);
    let guard_columns: String = decision_guard_columns(features)
        .iter()
        .map(|(name, ty)| format!(",\n    {name} {ty}"))
        .collect();
    let ttl = |column: &str| {
        if features.ttl && retention_days > 0 {
            format!("\nTTL {column} + INTERVAL {retention_days} DAY")
        } else {
            String::new()
        }
    };
    let db = database;
    vec![
        format!("CREATE DATABASE IF NOT EXISTS `{db}`"),
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{EVENTS}` (
    event_id String,
    trace_id String,
    parent_id String,
    agent {lc},
    type {lc},
    target {lc},
    subject String,
    time DateTime,
    time_us UInt64,
    source String,
    traceparent String,
    trace_derived UInt8,
    content_mode {lc},
    datacontenttype {lc},
    dataschema String,
    data String,
    data_encoding {lc},
    valid UInt8,
    error String,
    ingress_subject String,
    stream_seq UInt64,
    received_at DateTime,
    received_us UInt64,
    msg_key String
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (trace_id, event_id, msg_key){}",
            ttl("time")
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{DECISIONS}` (
    event_id String,
    trace_id String,
    decision_id String,
    agent {lc},
    type {lc},
    target {lc},
    subject String,
    parent_id String,
    decision {lc},
    reasons Array(String),
    errors Array(String),
    policy_hash {lc},
    time DateTime,
    time_us UInt64,
    eval_micros UInt64,
    ingress_subject String,
    trace_derived UInt8,
    receipt String,
    receipt_encoding {lc},
    valid UInt8,
    error String,
    stream_seq UInt64,
    received_at DateTime,
    received_us UInt64,
    msg_key String{guard_columns}
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (trace_id, event_id, msg_key){}",
            ttl("time")
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{GPU_LEASES}` (
    event_id String,
    pool {lc},
    gpu String,
    action {lc},
    holder String,
    expires_at DateTime,
    time DateTime,
    time_us UInt64,
    source String,
    type {lc},
    data String,
    data_encoding {lc},
    valid UInt8,
    error String,
    lease_subject String,
    stream_seq UInt64,
    received_at DateTime,
    received_us UInt64,
    msg_key String
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (pool, gpu, event_id, msg_key){}",
            ttl("time")
        ),
    ]
}

/// Statements that bring the retention of existing tables in line: only
/// where the server has TTL, a retention is configured and a table's TTL is
/// not already that one (a `MODIFY TTL` can rewrite the table's parts).
async fn retention_updates(
    client: &Client,
    database: &str,
    features: &ServerFeatures,
    retention_days: u32,
) -> Result<Vec<String>, clickhouse::error::Error> {
    if !features.ttl || retention_days == 0 {
        return Ok(Vec::new());
    }
    let engines: Vec<(String, String)> = client
        .query("SELECT name, engine_full FROM system.tables WHERE database = ?")
        .bind(database)
        .fetch_all()
        .await?;
    Ok([EVENTS, DECISIONS, GPU_LEASES]
        .iter()
        .filter(|t| {
            !engines
                .iter()
                .any(|(name, engine)| name == *t && has_retention(engine, retention_days))
        })
        .map(|t| {
            format!(
                "ALTER TABLE `{database}`.`{t}` MODIFY TTL time + INTERVAL {retention_days} DAY"
            )
        })
        .collect())
}

/// Whether a table's `engine_full` shows the TTL that [`ddl`] gives it
/// (the server writes `INTERVAL n DAY` back as `toIntervalDay(n)`).
fn has_retention(engine_full: &str, retention_days: u32) -> bool {
    engine_full.contains(&format!("TTL time + toIntervalDay({retention_days})"))
}

/// Creates the database and the tables where missing (never drops or
/// rewrites data; runs no DDL when all three exist) and applies the
/// configured retention where supported.
/// `client` must not have a default database set that might not exist yet.
pub async fn ensure(
    client: &Client,
    database: &str,
    retention_days: u32,
) -> Result<ServerFeatures, clickhouse::error::Error> {
    let features = ServerFeatures::detect(client).await?;
    // Only what is missing: a writer without DDL rights (the audit sink's
    // insert-only user) gets through when the operator created the schema.
    let existing: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = ?")
        .bind(database)
        .fetch_all()
        .await?;
    let complete = [EVENTS, DECISIONS, GPU_LEASES]
        .iter()
        .all(|t| existing.iter().any(|e| e == t));
    let creates = if complete {
        Vec::new()
    } else {
        ddl(database, &features, retention_days)
    };
    for statement in creates {
        client.query_raw(&statement).execute().await?;
    }
    for statement in retention_updates(client, database, &features, retention_days).await? {
        client.query_raw(&statement).execute().await?;
    }
    add_missing_columns(client, database, &features).await?;
    Ok(features)
}

/// Adds the columns a `decisions` table created by an older release lacks.
/// (`ADD COLUMN IF NOT EXISTS` is not on every supported server; asking
/// `system.columns` is.)
async fn add_missing_columns(
    client: &Client,
    database: &str,
    features: &ServerFeatures,
) -> Result<(), clickhouse::error::Error> {
    let existing: Vec<String> = client
        .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
        .bind(database)
        .bind(DECISIONS)
        .fetch_all()
        .await?;
    for (name, ty) in decision_guard_columns(features) {
        if !existing.iter().any(|c| c == name) {
            client
                .query_raw(&format!(
                    "ALTER TABLE `{database}`.`{DECISIONS}` ADD COLUMN {name} {ty}"
                ))
                .execute()
                .await?;
            tracing::info!(table = DECISIONS, column = name, "Audit column added.");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_detection() {
        let old = ServerFeatures::from_version("18.16.1");
        assert!(!old.low_cardinality && !old.ttl);
        let new = ServerFeatures::from_version("24.8.4.13");
        assert!(new.low_cardinality && new.ttl);
        assert!(!ServerFeatures::from_version("garbage").ttl);
    }

    #[test]
    fn ddl_uses_new_features_only_when_present() {
        let old = ddl("agentmesh", &ServerFeatures::from_version("18.16.1"), 30);
        assert!(
            old.iter()
                .all(|s| !s.contains("LowCardinality") && !s.contains("TTL"))
        );
        let new = ddl("agentmesh", &ServerFeatures::from_version("25.3.1"), 30);
        assert!(new[1].contains("agent LowCardinality(String)"));
        assert!(new[1].contains("TTL time + INTERVAL 30 DAY"));
        let forever = ddl("agentmesh", &ServerFeatures::from_version("25.3.1"), 0);
        assert!(forever.iter().all(|s| !s.contains("TTL")));
    }

    #[test]
    fn retention_read_back_from_engine_full() {
        let engine = "ReplacingMergeTree PARTITION BY toYYYYMM(time) \
            ORDER BY (trace_id, event_id, msg_key) TTL time + toIntervalDay(30) \
            SETTINGS index_granularity = 8192";
        assert!(has_retention(engine, 30));
        assert!(!has_retention(engine, 3));
        assert!(!has_retention(engine, 300));
        assert!(!has_retention("ReplacingMergeTree ORDER BY event_id", 30));
    }

    #[test]
    fn database_names() {
        assert!(check_database("agentmesh").is_ok());
        assert!(check_database("test_1").is_ok());
        for bad in ["", "1abc", "a-b", "a`b", "a.b"] {
            assert!(check_database(bad).is_err(), "{bad}");
        }
    }
}

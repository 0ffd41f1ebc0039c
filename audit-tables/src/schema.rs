//! The audit tables of `docs/contract.md` (database `agentmesh` by default) and the
//! one idempotent function that creates them.
//!
//! The DDL runs on ClickHouse 18.16 (what Debian ships and the tests use) and
//! on current servers. Features newer than 18.16 are used only where
//! `SELECT version()` says the server has them: `LowCardinality` for the
//! low-cardinality columns and `TTL` retention.
//!
//! Every table is a `ReplacingMergeTree` whose sorting key ends in the row's
//! identity, so the duplicates that at-least-once delivery produces collapse:
//! the shipped queries read with `FINAL`. An event is identified by its agent
//! and its id (two agents may both send an event `1`), so `events` and
//! `decisions` are sorted by `(trace_id, agent, event_id, msg_key)` (`msg_key`
//! tells apart messages that carry no id). `events` is partitioned by the
//! month the mesh received the event (`received_at`), never by the time the
//! agent wrote into it; `decisions` by the month the policy worker decided.
//!
//! Tables created by a release that keyed rows by event id alone (or
//! partitioned `events` by the agent's `time`) are migrated by [`ensure`]:
//! a table with the current layout is created, swapped in by `RENAME`, and
//! the old rows are copied into it; the old table is kept as
//! `<table>_old_layout` for the operator to check and drop.

use clickhouse::Client;

/// The database the audit tables live in unless configured otherwise.
pub const DEFAULT_DATABASE: &str = "agentmesh";

/// Table of every ingress event.
pub const EVENTS: &str = "events";
/// Table of every decision receipt.
pub const DECISIONS: &str = "decisions";
/// Table of GPU lease grants and releases.
pub const GPU_LEASES: &str = "gpu_leases";
/// Quarantine of the rows ClickHouse refused, with its error.
pub const REJECTED: &str = "rejected";
/// Every audit table, in creation order.
pub const TABLES: [&str; 4] = [EVENTS, DECISIONS, GPU_LEASES, REJECTED];

/// The sorting key of `events` and `decisions`: the workflow, then the
/// event's identity (agent and id; `msg_key` for messages without an id).
pub const EVENT_KEY: &str = "(trace_id, agent, event_id, msg_key)";
/// The partition key of `events`: the month the mesh received the event.
pub const EVENTS_PARTITION: &str = "toYYYYMM(received_at)";
/// The partition key of `decisions`: the month the policy worker decided
/// (`decided_at` of the receipt, else when the broker stored it).
pub const DECISIONS_PARTITION: &str = "toYYYYMM(time)";

/// The table engine of the audit tables: the same DDL template either way,
/// only the engine clause (and, for DDL an operator runs, `ON CLUSTER`)
/// differs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Engine {
    /// `ReplacingMergeTree()`: one server.
    #[default]
    Single,
    /// `ReplicatedReplacingMergeTree` with the ZooKeeper path
    /// [`replica_path`] and replica name `{replica}`: one shard of
    /// replicas, each server with the `{shard}` and `{replica}` macros set.
    /// Replicas deduplicate a block inserted twice (the same rows in the same
    /// order, e.g. a retry on another replica) through ZooKeeper, and the
    /// tables collapse any other duplicate like the single-server ones.
    Replicated {
        /// `ON CLUSTER '<cluster>'` on every statement (the statements then
        /// run on every server of the cluster; needs `remote_servers` and
        /// distributed DDL). `None`: the statements create the tables on the
        /// server they are sent to only, as the sink does on each replica.
        on_cluster: Option<String>,
    },
}

impl Engine {
    /// The `ON CLUSTER` clause, with its leading space (empty without one).
    fn on_cluster(&self) -> String {
        match self {
            Self::Replicated {
                on_cluster: Some(cluster),
            } => format!(" ON CLUSTER '{cluster}'"),
            _ => String::new(),
        }
    }

    /// The `ENGINE = …` clause of audit table `table` in `database`.
    fn clause(&self, database: &str, table: &str) -> String {
        match self {
            Self::Single => "ENGINE = ReplacingMergeTree()".to_owned(),
            Self::Replicated { .. } => format!(
                "ENGINE = ReplicatedReplacingMergeTree('{}', '{{replica}}')",
                replica_path(database, table)
            ),
        }
    }
}

/// The ZooKeeper path of a replicated audit table:
/// `/clickhouse/tables/{shard}/<database>/<table>` (`{shard}` is the
/// server's macro).
pub fn replica_path(database: &str, table: &str) -> String {
    format!("/clickhouse/tables/{{shard}}/{database}/{table}")
}

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

/// Columns added to a table after its first release: created with the
/// table, and added to an existing table by [`ensure`]. Every one defaults
/// to empty, which is what a message without the field means.
pub fn added_columns(table: &str, features: &ServerFeatures) -> Vec<(&'static str, String)> {
    let lc = low_cardinality(features);
    match table {
        EVENTS => vec![("parent_agent", lc.to_owned())],
        DECISIONS => {
            let mut columns = decision_guard_columns(features);
            columns.push(("parent_agent", lc.to_owned()));
            // The tool-result cache (docs/cache.md).
            columns.push(("cache", lc.to_owned()));
            columns.push(("cache_source", "String".to_owned()));
            // Signed decisions (docs/contract.md).
            columns.push(("data_sha256", "String".to_owned()));
            columns.push(("signer", lc.to_owned()));
            columns.push(("signature", "String".to_owned()));
            // Decisions signed in a batch (docs/security.md).
            columns.push(("batch_root", "String".to_owned()));
            columns.push(("batch_proof", "String".to_owned()));
            columns.push(("batch_signature", "String".to_owned()));
            // Workflow labels and redaction (docs/guardrails.md).
            columns.push(("labels", "Array(String)".to_owned()));
            columns.push(("labels_added", "Array(String)".to_owned()));
            columns.push(("labels_lost", "UInt8".to_owned()));
            columns.push(("redacted", "Array(String)".to_owned()));
            columns
        }
        _ => Vec::new(),
    }
}

/// The column a table's retention (`TTL`) counts from: for `events` when
/// the mesh received the event (an agent's `time` may be anything), else
/// the row's `time`.
fn ttl_column(table: &str) -> &'static str {
    if table == EVENTS {
        "received_at"
    } else {
        "time"
    }
}

/// The statements that create the database and the audit tables on one
/// server ([`Engine::Single`]).
pub fn ddl(database: &str, features: &ServerFeatures, retention_days: u32) -> Vec<String> {
    ddl_with(database, features, retention_days, &Engine::Single)
}

/// The statements that create the database and the audit tables with
/// `engine`: one template for a single server and for replicas.
pub fn ddl_with(
    database: &str,
    features: &ServerFeatures,
    retention_days: u32,
    engine: &Engine,
) -> Vec<String> {
    let mut statements = vec![format!(
        "CREATE DATABASE IF NOT EXISTS `{database}`{}",
        engine.on_cluster()
    )];
    statements.extend(
        TABLES
            .iter()
            .filter_map(|t| create_table(database, t, t, features, retention_days, engine)),
    );
    statements
}

/// The `CREATE TABLE` of audit table `table`, created under the name `name`
/// (the table itself, or a new table a migration swaps in); `None` for a
/// table that is not one of [`TABLES`].
fn create_table(
    database: &str,
    name: &str,
    table: &str,
    features: &ServerFeatures,
    retention_days: u32,
    engine: &Engine,
) -> Option<String> {
    let lc = low_cardinality(features);
    let on_cluster = engine.on_cluster();
    let engine = engine.clause(database, table);
    let ttl = |column: &str| {
        if features.ttl && retention_days > 0 {
            format!("\nTTL {column} + INTERVAL {retention_days} DAY")
        } else {
            String::new()
        }
    };
    let db = database;
    let statement = match table {
        EVENTS => format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{name}`{on_cluster} (
    event_id String,
    trace_id String,
    parent_id String,
    parent_agent {lc},
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
) {engine}
PARTITION BY {EVENTS_PARTITION}
ORDER BY {EVENT_KEY}{}",
            ttl(ttl_column(EVENTS))
        ),
        DECISIONS => format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{name}`{on_cluster} (
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
    msg_key String{}
) {engine}
PARTITION BY {DECISIONS_PARTITION}
ORDER BY {EVENT_KEY}{}",
            added_columns(DECISIONS, features)
                .iter()
                .map(|(column, ty)| format!(",\n    {column} {ty}"))
                .collect::<String>(),
            ttl(ttl_column(DECISIONS))
        ),
        GPU_LEASES => format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{name}`{on_cluster} (
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
) {engine}
PARTITION BY toYYYYMM(time)
ORDER BY (pool, gpu, event_id, msg_key){}",
            ttl(ttl_column(GPU_LEASES))
        ),
        REJECTED => format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{name}`{on_cluster} (
    `table` {lc},
    error String,
    row String,
    stream {lc},
    subject String,
    stream_seq UInt64,
    received_at DateTime,
    received_us UInt64,
    headers String,
    payload String,
    payload_encoding {lc},
    time DateTime,
    time_us UInt64
) {engine}
PARTITION BY toYYYYMM(time)
ORDER BY (`table`, stream_seq, received_us){}",
            ttl(ttl_column(REJECTED))
        ),
        _ => return None,
    };
    Some(statement)
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
    let engines = tables(client, database).await?;
    Ok(TABLES
        .iter()
        .filter(|t| {
            !engines.iter().any(|(name, engine)| {
                name == *t && has_retention(engine, ttl_column(t), retention_days)
            })
        })
        .map(|t| modify_ttl(database, t, retention_days))
        .collect())
}

/// The statement [`ensure`] runs to give an existing audit table the
/// retention `ddl` would create it with (20.1+).
pub fn modify_ttl(database: &str, table: &str, retention_days: u32) -> String {
    format!(
        "ALTER TABLE `{database}`.`{table}` MODIFY TTL {} + INTERVAL {retention_days} DAY",
        ttl_column(table)
    )
}

/// The statement [`ensure`] runs to add one of [`added_columns`] to a table
/// created by an older release.
pub fn add_column(database: &str, table: &str, name: &str, ty: &str) -> String {
    format!("ALTER TABLE `{database}`.`{table}` ADD COLUMN {name} {ty}")
}

/// Whether a table's `engine_full` shows the TTL that [`ddl`] gives it
/// (the server writes `INTERVAL n DAY` back as `toIntervalDay(n)`).
fn has_retention(engine_full: &str, column: &str, retention_days: u32) -> bool {
    engine_full.contains(&format!("TTL {column} + toIntervalDay({retention_days})"))
}

/// `(name, engine_full)` of every table in `database`.
async fn tables(
    client: &Client,
    database: &str,
) -> Result<Vec<(String, String)>, clickhouse::error::Error> {
    client
        .query("SELECT name, engine_full FROM system.tables WHERE database = ?")
        .bind(database)
        .fetch_all()
        .await
}

/// The expression after `clause` (`ORDER BY`, `PARTITION BY`) in a table's
/// `engine_full`: up to the matching parenthesis, else the next space.
fn engine_clause<'a>(engine_full: &'a str, clause: &str) -> Option<&'a str> {
    let start = engine_full.find(&format!("{clause} "))? + clause.len() + 1;
    let rest = &engine_full[start..];
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.saturating_sub(1);
                if depth == 0 && rest.starts_with('(') {
                    return Some(&rest[..=i]);
                }
            }
            ' ' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    Some(rest)
}

/// Whether an `events` or `decisions` table has the current layout: the
/// sorting key with the agent, and the partitioning by mesh time. Other
/// tables always have it.
pub fn has_current_layout(table: &str, engine_full: &str) -> bool {
    let same = |clause: &str, expected: &str| {
        engine_clause(engine_full, clause).is_some_and(|found| {
            found.split_whitespace().collect::<String>()
                == expected.split_whitespace().collect::<String>()
        })
    };
    match table {
        EVENTS => same("ORDER BY", EVENT_KEY) && same("PARTITION BY", EVENTS_PARTITION),
        DECISIONS => same("ORDER BY", EVENT_KEY) && same("PARTITION BY", DECISIONS_PARTITION),
        _ => true,
    }
}

/// The name an old-layout table has while its rows are copied into the new
/// one; a table under this name means a copy is still to be (re)done.
fn migrating_name(table: &str) -> String {
    format!("{table}__migrating")
}

/// The name the new table has between its creation and the swap.
fn fresh_name(table: &str) -> String {
    format!("{table}__new")
}

/// The name the old table is kept under once its rows are copied.
pub fn old_layout_name(table: &str) -> String {
    format!("{table}_old_layout")
}

/// Creates the database and the tables where missing, migrates `events`
/// and `decisions` tables of an older layout (see the module doc; rows are
/// copied, never dropped), adds missing columns and applies the configured
/// retention where supported. Runs no DDL when everything is current.
/// `client` must not have a default database set that might not exist yet.
pub async fn ensure(
    client: &Client,
    database: &str,
    retention_days: u32,
) -> Result<ServerFeatures, clickhouse::error::Error> {
    ensure_with(client, database, retention_days, &Engine::Single).await
}

/// [`ensure`] with tables of `engine` where they are created. Tables that
/// exist keep their engine (a single-server table is not made replicated:
/// logged).
pub async fn ensure_with(
    client: &Client,
    database: &str,
    retention_days: u32,
    engine: &Engine,
) -> Result<ServerFeatures, clickhouse::error::Error> {
    let features = ServerFeatures::detect(client).await?;
    // Only what is missing: a writer without DDL rights (the audit sink's
    // insert-only user) gets through when the operator created the schema.
    let existing = tables(client, database).await?;
    let complete = TABLES
        .iter()
        .all(|t| existing.iter().any(|(name, _)| name == t));
    let creates = if complete {
        Vec::new()
    } else {
        ddl_with(database, &features, retention_days, engine)
    };
    for statement in creates {
        client.query_raw(&statement).execute().await?;
    }
    if matches!(engine, Engine::Replicated { .. }) {
        for (table, kind) in &existing {
            if TABLES.contains(&table.as_str()) && !kind.starts_with("Replicated") {
                tracing::warn!(
                    table = %table,
                    engine = %kind,
                    "Replicated audit tables asked for, but this table exists with a single-server engine: kept as it is (see docs/deployment.md)."
                );
            }
        }
    }
    migrate(
        client,
        database,
        &features,
        retention_days,
        &existing,
        engine,
    )
    .await?;
    add_missing_columns(client, database, &features).await?;
    for statement in retention_updates(client, database, &features, retention_days).await? {
        client.query_raw(&statement).execute().await?;
    }
    Ok(features)
}

/// Moves `events` and `decisions` tables of an older layout to the current
/// one without losing a row: create the new table, swap it in with one
/// `RENAME` (from then on inserts land in the new table), copy the old rows
/// over (`INSERT … SELECT`; a copy done twice collapses like any duplicate),
/// and keep the old table as [`old_layout_name`]. An interrupted copy is
/// redone by the next call, found by the [`migrating_name`] table.
/// Replicated tables are left alone (a plain table must not replace them):
/// logged, to be migrated by the operator as `docs/audit.md` describes.
async fn migrate(
    client: &Client,
    database: &str,
    features: &ServerFeatures,
    retention_days: u32,
    existing: &[(String, String)],
    new_engine: &Engine,
) -> Result<(), clickhouse::error::Error> {
    let db = database;
    for table in [EVENTS, DECISIONS] {
        let engine = existing
            .iter()
            .find(|(name, _)| name == table)
            .map(|(_, engine)| engine.as_str());
        let migrating = migrating_name(table);
        let interrupted = existing.iter().any(|(name, _)| *name == migrating);
        if let Some(engine) = engine
            && !has_current_layout(table, engine)
            && !interrupted
        {
            if engine.starts_with("Replicated") {
                tracing::error!(
                    table,
                    engine,
                    "Audit table has the old sorting key but is replicated: not migrated; \
                     rows of two agents with the same event id collapse until it is (see docs/audit.md)."
                );
                continue;
            }
            let fresh = fresh_name(table);
            // Left over by a run that stopped before the swap: empty.
            client
                .query_raw(&format!("DROP TABLE IF EXISTS `{db}`.`{fresh}`"))
                .execute()
                .await?;
            if let Some(create) =
                create_table(db, &fresh, table, features, retention_days, new_engine)
            {
                client.query_raw(&create).execute().await?;
            }
            client
                .query_raw(&format!(
                    "RENAME TABLE `{db}`.`{table}` TO `{db}`.`{migrating}`, `{db}`.`{fresh}` TO `{db}`.`{table}`"
                ))
                .execute()
                .await?;
            tracing::warn!(
                table,
                old_engine = engine,
                "Audit table has an old layout (key without the agent, or events partitioned by agent time): new table swapped in; copying the old rows."
            );
        } else if !interrupted {
            continue;
        }
        copy_rows(client, db, &migrating, table).await?;
        let mut kept = old_layout_name(table);
        let names = tables(client, db).await?;
        if names.iter().any(|(name, _)| *name == kept) {
            kept = format!("{kept}_{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
        }
        client
            .query_raw(&format!(
                "RENAME TABLE `{db}`.`{migrating}` TO `{db}`.`{kept}`"
            ))
            .execute()
            .await?;
        tracing::warn!(
            table,
            kept = %kept,
            "Audit table migrated: every old row copied; the old table is kept, drop it once checked (DROP TABLE {db}.{kept})."
        );
    }
    Ok(())
}

/// `INSERT INTO to SELECT … FROM from` over the stored columns both have
/// (a column the old table lacks gets its default; materialized and alias
/// columns are computed, not copied).
async fn copy_rows(
    client: &Client,
    database: &str,
    from: &str,
    to: &str,
) -> Result<(), clickhouse::error::Error> {
    let columns = |table: &str| {
        client
            .query(
                "SELECT name FROM system.columns WHERE database = ? AND table = ? \
                 AND default_kind NOT IN ('MATERIALIZED', 'ALIAS')",
            )
            .bind(database)
            .bind(table)
            .fetch_all::<String>()
    };
    let target = columns(to).await?;
    let common: Vec<String> = columns(from)
        .await?
        .into_iter()
        .filter(|c| target.contains(c))
        .map(|c| format!("`{c}`"))
        .collect();
    let list = common.join(", ");
    let rows: u64 = client
        .query(&format!("SELECT count() FROM `{database}`.`{from}`"))
        .fetch_one()
        .await?;
    client
        .query_raw(&format!(
            "INSERT INTO `{database}`.`{to}` ({list}) SELECT {list} FROM `{database}`.`{from}`"
        ))
        .execute()
        .await?;
    tracing::info!(from, to, rows, "Audit rows copied to the new layout.");
    Ok(())
}

/// Adds the columns a table created by an older release lacks.
/// (`ADD COLUMN IF NOT EXISTS` is not on every supported server; asking
/// `system.columns` is.)
async fn add_missing_columns(
    client: &Client,
    database: &str,
    features: &ServerFeatures,
) -> Result<(), clickhouse::error::Error> {
    for table in [EVENTS, DECISIONS] {
        let existing: Vec<String> = client
            .query("SELECT name FROM system.columns WHERE database = ? AND table = ?")
            .bind(database)
            .bind(table)
            .fetch_all()
            .await?;
        for (name, ty) in added_columns(table, features) {
            if !existing.iter().any(|c| c == name) {
                client
                    .query_raw(&add_column(database, table, name, &ty))
                    .execute()
                    .await?;
                tracing::info!(table, column = name, "Audit column added.");
            }
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
        assert!(new[1].contains("TTL received_at + INTERVAL 30 DAY"));
        assert!(new[2].contains("TTL time + INTERVAL 30 DAY"));
        let forever = ddl("agentmesh", &ServerFeatures::from_version("25.3.1"), 0);
        assert!(forever.iter().all(|s| !s.contains("TTL")));
        assert_eq!(new.len(), 1 + TABLES.len());
    }

    #[test]
    fn events_and_decisions_are_keyed_by_agent_and_id() {
        let ddl = ddl("agentmesh", &ServerFeatures::from_version("18.16.1"), 0);
        assert!(ddl[1].contains(
            "PARTITION BY toYYYYMM(received_at)\nORDER BY (trace_id, agent, event_id, msg_key)"
        ));
        assert!(ddl[1].contains("parent_agent String"));
        assert!(ddl[2].contains(
            "PARTITION BY toYYYYMM(time)\nORDER BY (trace_id, agent, event_id, msg_key)"
        ));
        assert!(ddl[2].contains("parent_agent String"));
    }

    #[test]
    fn replicated_tables_differ_only_in_engine_and_cluster() {
        let features = ServerFeatures::from_version("18.16.1");
        let single = ddl("agentmesh", &features, 0);
        let replicated = ddl_with(
            "agentmesh",
            &features,
            0,
            &Engine::Replicated { on_cluster: None },
        );
        assert_eq!(single[0], replicated[0]);
        for (table, (one, many)) in TABLES.iter().zip(single[1..].iter().zip(&replicated[1..])) {
            let engine = format!(
                "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/agentmesh/{table}', '{{replica}}')"
            );
            assert!(many.contains(&engine), "{many}");
            assert_eq!(&many.replace(&engine, "ENGINE = ReplacingMergeTree()"), one);
        }
        let cluster = ddl_with(
            "agentmesh",
            &features,
            0,
            &Engine::Replicated {
                on_cluster: Some("{cluster}".into()),
            },
        );
        assert_eq!(
            cluster[0],
            "CREATE DATABASE IF NOT EXISTS `agentmesh` ON CLUSTER '{cluster}'"
        );
        assert!(cluster[1].starts_with(
            "CREATE TABLE IF NOT EXISTS `agentmesh`.`events` ON CLUSTER '{cluster}' ("
        ));
    }

    #[test]
    fn layout_read_back_from_engine_full() {
        let old = "ReplacingMergeTree() PARTITION BY toYYYYMM(time) \
            ORDER BY (trace_id, event_id, msg_key) SETTINGS index_granularity = 8192";
        assert!(!has_current_layout(EVENTS, old));
        assert!(!has_current_layout(DECISIONS, old));
        let events = "ReplacingMergeTree() PARTITION BY toYYYYMM(received_at) \
            ORDER BY (trace_id, agent, event_id, msg_key) SETTINGS index_granularity = 8192";
        assert!(has_current_layout(EVENTS, events));
        // Current servers write the engine without `()` and with a TTL.
        let decisions = "ReplacingMergeTree PARTITION BY toYYYYMM(time) \
            ORDER BY (trace_id, agent, event_id, msg_key) TTL time + toIntervalDay(30) \
            SETTINGS index_granularity = 8192";
        assert!(has_current_layout(DECISIONS, decisions));
        assert!(
            !has_current_layout(EVENTS, decisions),
            "events by agent time"
        );
        assert!(has_current_layout(GPU_LEASES, old));
        assert_eq!(
            engine_clause("X ORDER BY event_id", "ORDER BY"),
            Some("event_id")
        );
    }

    #[test]
    fn retention_read_back_from_engine_full() {
        let engine = "ReplacingMergeTree PARTITION BY toYYYYMM(time) \
            ORDER BY (trace_id, event_id, msg_key) TTL time + toIntervalDay(30) \
            SETTINGS index_granularity = 8192";
        assert!(has_retention(engine, "time", 30));
        assert!(!has_retention(engine, "received_at", 30));
        assert!(!has_retention(engine, "time", 3));
        assert!(!has_retention(engine, "time", 300));
        assert!(!has_retention(
            "ReplacingMergeTree ORDER BY event_id",
            "time",
            30
        ));
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

#[cfg(test)]
mod columns_agree {
    use std::collections::BTreeSet;

    use clickhouse::Row;

    use super::*;
    use crate::rows::{DecisionRow, EventRow, GpuLeaseRow, RejectedRow};

    /// The columns of the `CREATE TABLE` of `table` in `statements`.
    fn ddl_columns(statements: &[String], table: &str) -> BTreeSet<String> {
        let create = statements
            .iter()
            .find(|s| s.contains(&format!("`.`{table}` (")))
            .unwrap_or_else(|| panic!("no CREATE TABLE for `{table}`"));
        let body = create
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(") ENGINE"))
            .map(|(columns, _)| columns)
            .unwrap_or_else(|| panic!("cannot read the columns of `{table}`"));
        body.split(",\n")
            .filter_map(|line| line.split_whitespace().next())
            .map(|column| column.trim_matches('`').to_owned())
            .collect()
    }

    fn row_columns<R: Row>() -> BTreeSet<String> {
        R::COLUMN_NAMES.iter().map(|c| (*c).to_owned()).collect()
    }

    /// The sink inserts by column name: every field of a row type must be a
    /// column of its table, and every column a field (a column no row
    /// fills would stay empty unnoticed), on old and current servers.
    #[test]
    fn each_tables_ddl_and_row_type_name_the_same_columns() {
        for version in ["18.16.1", "24.8.4"] {
            let statements = ddl("agentmesh", &ServerFeatures::from_version(version), 0);
            for (table, row) in [
                (EVENTS, row_columns::<EventRow>()),
                (DECISIONS, row_columns::<DecisionRow>()),
                (GPU_LEASES, row_columns::<GpuLeaseRow>()),
                (REJECTED, row_columns::<RejectedRow>()),
            ] {
                let ddl = ddl_columns(&statements, table);
                assert_eq!(
                    ddl,
                    row,
                    "`{table}` on {version}: only in the DDL {:?}, only in the row type {:?}",
                    ddl.difference(&row).collect::<Vec<_>>(),
                    row.difference(&ddl).collect::<Vec<_>>()
                );
            }
        }
    }
}

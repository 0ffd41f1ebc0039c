//! `meshctl audit verify`: checks the `decisions` table against what it
//! cannot have changed — each receipt's signature (its own, or its
//! batch root's with its inclusion proof) by a trusted policy worker, and the signed checkpoints of `MESH_DECISION` on `MESH_AUDIT`
//! (`docs/contract.md`, "Signed decisions"; `docs/security.md`, "What a
//! recipient and an auditor can prove").
//!
//! A row is **altered** when a column differs from its own stored receipt,
//! the receipt's signature does not verify, or the receipt differs from the
//! one checkpointed at its stream sequence; **inserted** when its stream
//! sequence was checkpointed for another receipt, or for none although
//! later ones were; a checkpointed receipt with no row is **deleted**.
//!
//! It also compares each stream with its table (`MESH_INGRESS` with
//! `events`, `MESH_DECISION` with `decisions`): a message the stream still
//! holds that has no row (and was not refused into `rejected`) is
//! **missing** — ClickHouse lost an insert the sink had acknowledged, after
//! a power cut for example. `meshctl audit repair` re-inserts those rows
//! from the streams (idempotent: the tables are `ReplacingMergeTree`s) and
//! names what it cannot recover: rows whose messages are past the stream's
//! retention.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use anyhow::Context as _;
use async_nats::jetstream;
use audit_tables::rows::{self, DecisionRow, Meta};
use clap::Subcommand;
use schemas::signing::{
    Checkpoint, CheckpointEntry, Signers, VerifiedRoots, sha256_hex, verify_signature,
};
use schemas::{DecisionReceipt, headers, subjects};

use crate::servers::Endpoints;

/// `meshctl audit …`
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Recompute the audit from ClickHouse and check it against the signed
    /// checkpoints on MESH_AUDIT: prints `ok` and the count checked, or
    /// each row altered, deleted or inserted (exit status 1).
    Verify {
        /// Only decisions made at or after this time: RFC 3339, `YYYY-MM-DD[ HH:MM:SS]` (UTC), or an age such as `30m`, `6h`, `2d`.
        #[arg(long)]
        since: Option<String>,
        /// Only the decisions of this trace (32 hex characters).
        #[arg(long, value_parser = crate::publish::parse_trace_id)]
        trace: Option<String>,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Re-insert the audit rows ClickHouse lost from the streams that
    /// still hold them (idempotent), and name what cannot be recovered
    /// (past the stream's retention); exit status 1 when something could
    /// not be.
    Repair {
        /// Only say what would be re-inserted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

/// What is wrong with one row or checkpoint (`-o json`: tagged by
/// `kind`: `altered`, `deleted`, `missing`, `inserted`, `checkpoint`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Finding {
    /// A row's content is not what was signed and checkpointed.
    Altered {
        /// Its `MESH_DECISION` sequence.
        seq: u64,
        /// `<agent>/<event id>`.
        key: String,
        /// How.
        why: String,
    },
    /// A checkpointed receipt has no row.
    Deleted {
        /// Its `MESH_DECISION` sequence.
        seq: u64,
        /// `<agent>/<event id>`.
        key: String,
        /// Its trace.
        trace_id: String,
        /// Whether `MESH_DECISION` still holds it (`meshctl audit repair`
        /// restores the row).
        in_stream: bool,
    },
    /// A message the stream holds that its table has no row for.
    Missing {
        /// `events` or `decisions`.
        table: &'static str,
        /// Its stream.
        stream: &'static str,
        /// Its stream sequence.
        seq: u64,
        /// `<agent>/<event id>`.
        key: String,
    },
    /// A row that no checkpoint accounts for.
    Inserted {
        /// The sequence the row claims.
        seq: u64,
        /// `<agent>/<event id>` of the row.
        key: String,
        /// How.
        why: String,
    },
    /// A checkpoint that does not verify or breaks its signer's chain.
    Checkpoint {
        /// Its `MESH_AUDIT` sequence.
        seq: u64,
        /// How.
        why: String,
    },
}

impl Finding {
    fn order(&self) -> (u8, u64) {
        match self {
            Self::Checkpoint { seq, .. } => (0, *seq),
            Self::Altered { seq, .. } | Self::Deleted { seq, .. } | Self::Inserted { seq, .. } => {
                (1, *seq)
            }
            Self::Missing { seq, .. } => (2, *seq),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Altered { seq, key, why } => {
                write!(
                    f,
                    "altered: decision {key} (MESH_DECISION seq {seq}): {why}"
                )
            }
            Self::Deleted {
                seq,
                key,
                trace_id,
                in_stream,
            } => write!(
                f,
                "deleted: decision {key} (MESH_DECISION seq {seq}, trace {trace_id}) is checkpointed but has no row{}",
                if *in_stream {
                    "; the stream still holds it: `meshctl audit repair` re-inserts it"
                } else {
                    "; past the stream's retention: not recoverable"
                }
            ),
            Self::Missing {
                table,
                stream,
                seq,
                key,
            } => write!(
                f,
                "missing: {table} row of {key} ({stream} seq {seq}): the stream holds it, the table does not (`meshctl audit repair` re-inserts it)"
            ),
            Self::Inserted { seq, key, why } => {
                write!(
                    f,
                    "inserted: decision {key} (claims MESH_DECISION seq {seq}): {why}"
                )
            }
            Self::Checkpoint { seq, why } => write!(f, "checkpoint MESH_AUDIT seq {seq}: {why}"),
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Rows checked.
    pub(crate) rows: usize,
    /// Checkpoints read.
    pub(crate) checkpoints: usize,
    /// Rows newer than every checkpoint (signature checked only).
    pub(crate) pending: usize,
    /// Stream messages compared with their tables.
    pub(crate) compared: usize,
    /// Everything wrong, first by sequence.
    pub(crate) findings: Vec<Finding>,
}

/// The filters of `--since` and `--trace`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Filter {
    /// Decisions at or after this instant (microseconds since the epoch).
    pub(crate) since_us: Option<i64>,
    /// Only this trace.
    pub(crate) trace: Option<String>,
}

impl Filter {
    fn keeps_us(&self, trace_id: &str, time_us: u64) -> bool {
        self.trace.as_deref().is_none_or(|t| t == trace_id)
            && self
                .since_us
                .is_none_or(|since| i64::try_from(time_us).unwrap_or(i64::MAX) >= since)
    }

    fn keeps(&self, trace_id: &str, decided_at: &str) -> bool {
        self.trace.as_deref().is_none_or(|t| t == trace_id)
            && self.since_us.is_none_or(|since| {
                chrono::DateTime::parse_from_rfc3339(decided_at)
                    .map(|t| t.timestamp_micros() >= since)
                    .unwrap_or(true)
            })
    }
}

/// Reads the signers, the checkpoints and the rows, and checks them.
pub(crate) async fn verify(endpoints: &Endpoints, filter: &Filter) -> anyhow::Result<Report> {
    let js = jetstream::new(endpoints.connect_nats().await?);
    let kv = js
        .get_key_value(subjects::BUCKET_SIGNERS)
        .await
        .with_context(|| format!("opening `{}`", subjects::BUCKET_SIGNERS))?;
    let signers = Signers::new(crate::signers::records(&kv).await?);
    let mut report = Report::default();
    let entries = checkpoints(&js, &signers, &mut report).await?;
    let rows = fetch_rows(endpoints, filter).await?;
    check_rows(&signers, &entries, rows, filter, &mut report);
    for pair in PAIRS {
        let gaps = gaps(&js, endpoints, pair, filter).await?;
        report.compared += gaps.compared;
        let held: std::collections::HashSet<u64> = gaps.missing.iter().map(|m| m.seq).collect();
        if pair.table == audit_tables::schema::DECISIONS {
            // A checkpointed receipt already reported deleted: say whether
            // the stream can restore it rather than name it twice.
            for finding in &mut report.findings {
                if let Finding::Deleted { seq, in_stream, .. } = finding {
                    *in_stream = held.contains(seq);
                }
            }
        }
        let deleted: std::collections::HashSet<u64> = report
            .findings
            .iter()
            .filter_map(|f| match f {
                Finding::Deleted { seq, .. } if pair.table == audit_tables::schema::DECISIONS => {
                    Some(*seq)
                }
                _ => None,
            })
            .collect();
        for gap in gaps.missing {
            if !deleted.contains(&gap.seq) {
                report.findings.push(Finding::Missing {
                    table: pair.table,
                    stream: pair.stream,
                    seq: gap.seq,
                    key: gap.key,
                });
            }
        }
    }
    report.findings.sort_by_key(Finding::order);
    Ok(report)
}

/// A stream and the table its messages become rows of.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pair {
    stream: &'static str,
    table: &'static str,
}

/// What `verify` and `repair` compare.
const PAIRS: [Pair; 2] = [
    Pair {
        stream: subjects::STREAM_INGRESS,
        table: audit_tables::schema::EVENTS,
    },
    Pair {
        stream: subjects::STREAM_DECISION,
        table: audit_tables::schema::DECISIONS,
    },
];

/// A message of a stream with no row in its table.
#[derive(Debug)]
struct Gap {
    seq: u64,
    key: String,
    /// The row it makes, to re-insert.
    row: Row,
}

#[derive(Debug)]
enum Row {
    Event(Box<rows::EventRow>),
    Decision(Box<DecisionRow>),
}

/// What one stream-against-table comparison found.
#[derive(Debug, Default)]
struct Gaps {
    /// Messages compared.
    compared: usize,
    /// The stream's first sequence (what is older is past its retention).
    first_seq: u64,
    missing: Vec<Gap>,
}

/// The sequences of `pair.stream` that have a row in `pair.table` or were
/// refused into `rejected`.
async fn accounted(endpoints: &Endpoints, pair: Pair) -> anyhow::Result<HashSet<u64>> {
    let db = &endpoints.database;
    let client = endpoints.clickhouse();
    let mut seqs: HashSet<u64> = client
        .query(&format!(
            "SELECT DISTINCT stream_seq FROM `{db}`.{} FINAL",
            pair.table
        ))
        .fetch_all::<u64>()
        .await
        .with_context(|| format!("reading `{db}.{}`", pair.table))?
        .into_iter()
        .collect();
    let refused = client
        .query(&format!(
            "SELECT stream_seq FROM `{db}`.{} WHERE `table` = ?",
            audit_tables::schema::REJECTED
        ))
        .bind(pair.table)
        .fetch_all::<u64>()
        .await
        .with_context(|| format!("reading `{db}.rejected`"))?;
    seqs.extend(refused);
    Ok(seqs)
}

/// The messages `pair.stream` holds that `pair.table` has no row for
/// (within `filter`), with the rows they make.
async fn gaps(
    js: &jetstream::Context,
    endpoints: &Endpoints,
    pair: Pair,
    filter: &Filter,
) -> anyhow::Result<Gaps> {
    let mut stream = js
        .get_stream(pair.stream)
        .await
        .with_context(|| format!("opening `{}`", pair.stream))?;
    let state = stream.info().await?.state.clone();
    let mut out = Gaps {
        first_seq: state.first_sequence,
        ..Gaps::default()
    };
    if state.messages == 0 {
        return Ok(out);
    }
    let accounted = accounted(endpoints, pair).await?;
    for seq in state.first_sequence..=state.last_sequence {
        if accounted.contains(&seq) {
            out.compared += 1;
            continue;
        }
        let message = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading {} seq {seq}", pair.stream));
            }
        };
        out.compared += 1;
        let meta = Meta {
            stream: pair.stream.to_owned(),
            stream_seq: seq,
            received_us: i64::try_from(message.time.unix_timestamp_nanos() / 1000).unwrap_or(0),
        };
        let (row, key, trace, time_us) = if pair.table == audit_tables::schema::EVENTS {
            let row = rows::event_row(
                message.subject.as_str(),
                Some(&message.headers),
                &message.payload,
                &meta,
            );
            let key = subjects::event_key(&row.agent, &row.event_id);
            let (trace, time) = (row.trace_id.clone(), row.time_us);
            (Row::Event(Box::new(row)), key, trace, time)
        } else {
            let row = rows::decision_row(message.subject.as_str(), &message.payload, &meta);
            let key = key_of(&row);
            let (trace, time) = (row.trace_id.clone(), row.time_us);
            (Row::Decision(Box::new(row)), key, trace, time)
        };
        if filter.keeps_us(&trace, time_us) {
            out.missing.push(Gap { seq, key, row });
        }
    }
    Ok(out)
}

/// Every checkpointed receipt by stream sequence, after checking each
/// checkpoint's signature and its signer's chain.
async fn checkpoints(
    js: &jetstream::Context,
    signers: &Signers,
    report: &mut Report,
) -> anyhow::Result<BTreeMap<u64, CheckpointEntry>> {
    let mut stream = js
        .get_stream(subjects::STREAM_AUDIT)
        .await
        .with_context(|| format!("opening `{}`", subjects::STREAM_AUDIT))?;
    let state = stream.info().await?.state.clone();
    let mut heads: HashMap<String, String> = HashMap::new();
    let mut entries: BTreeMap<u64, CheckpointEntry> = BTreeMap::new();
    if state.messages == 0 {
        return Ok(entries);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) => {
                report.findings.push(Finding::Checkpoint {
                    seq,
                    why: format!("missing from the stream ({e})"),
                });
                continue;
            }
        };
        report.checkpoints += 1;
        let (signer, checkpoint) = match verified(signers, &message) {
            Ok(verified) => verified,
            Err(why) => {
                report.findings.push(Finding::Checkpoint { seq, why });
                continue;
            }
        };
        let head = heads.entry(signer.clone()).or_default();
        if checkpoint.prev != *head || checkpoint.signer != signer {
            report.findings.push(Finding::Checkpoint {
                seq,
                why: format!(
                    "breaks the chain of signer {signer}: links to `{}`, its previous checkpoint is `{head}`",
                    checkpoint.prev
                ),
            });
        }
        *head = sha256_hex(&message.payload);
        merge_entries(&mut entries, checkpoint.entries, seq, report);
    }
    Ok(entries)
}

/// The signer and the checkpoint in `message`, once its signature is
/// checked against a signer trusted at the checkpoint's time; else why not.
fn verified(
    signers: &Signers,
    message: &async_nats::jetstream::message::StreamMessage,
) -> Result<(String, Checkpoint), String> {
    let header = |name| {
        message
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let (signer, signature) = (header(headers::SIGNER), header(headers::SIGNATURE));
    let checkpoint: Checkpoint =
        serde_json::from_slice(&message.payload).map_err(|e| format!("not a checkpoint: {e}"))?;
    signers
        .get(&signer)
        .map(|r| r.trusts(&checkpoint.created_at))
        .unwrap_or(Err(schemas::signing::Refused::UnknownSigner(
            signer.clone(),
        )))
        .and_then(|()| verify_signature(&signer, &message.payload, &signature))
        .map_err(|why| why.to_string())?;
    Ok((signer, checkpoint))
}

/// Adds the entries of checkpoint `seq` to `entries`; a receipt
/// checkpointed twice with different contents is a finding.
fn merge_entries(
    entries: &mut BTreeMap<u64, CheckpointEntry>,
    new: Vec<CheckpointEntry>,
    seq: u64,
    report: &mut Report,
) {
    for entry in new {
        match entries.get(&entry.seq) {
            Some(seen) if seen.leaf != entry.leaf || seen.key != entry.key => {
                report.findings.push(Finding::Checkpoint {
                    seq,
                    why: format!(
                        "MESH_DECISION seq {} is checkpointed twice with different receipts",
                        entry.seq
                    ),
                });
            }
            Some(_) => {}
            None => {
                entries.insert(entry.seq, entry);
            }
        }
    }
}

async fn fetch_rows(endpoints: &Endpoints, filter: &Filter) -> anyhow::Result<Vec<DecisionRow>> {
    let mut sql = format!(
        "SELECT ?fields FROM `{}`.{} FINAL WHERE 1",
        endpoints.database,
        audit_tables::schema::DECISIONS
    );
    if filter.since_us.is_some() {
        sql.push_str(" AND time_us >= ?");
    }
    if filter.trace.is_some() {
        sql.push_str(" AND trace_id = ?");
    }
    sql.push_str(" ORDER BY stream_seq");
    let mut query = endpoints.clickhouse().query(&sql);
    if let Some(since) = filter.since_us {
        query = query.bind(u64::try_from(since).unwrap_or(0));
    }
    if let Some(trace) = &filter.trace {
        query = query.bind(trace.as_str());
    }
    query
        .fetch_all::<DecisionRow>()
        .await
        .with_context(|| format!("reading `{}.decisions`", endpoints.database))
}

/// Whether a checkpoint's key names the row's event: `<agent>/<id>`, or
/// for an invalid event the worker's `invalid-<ingress seq>` (its
/// `Nats-Msg-Id`: an invalid event may have no id). The receipt's hash,
/// checked next, proves the content either way.
fn same_key(checkpointed: &str, key: &str, decision: &str) -> bool {
    checkpointed == key
        || (decision == "invalid"
            && checkpointed
                .strip_prefix("invalid-")
                .is_some_and(|n| n.parse::<u64>().is_ok()))
}

fn key_of(row: &DecisionRow) -> String {
    subjects::event_key(&row.agent, &row.event_id)
}

/// The columns where `row` differs from the row its own receipt makes.
fn altered_columns(row: &DecisionRow, receipt: &[u8]) -> Vec<String> {
    let meta = Meta {
        stream: subjects::STREAM_DECISION.to_owned(),
        stream_seq: row.stream_seq,
        received_us: i64::try_from(row.received_us).unwrap_or(0),
    };
    let rebuilt = rows::decision_row(&subjects::decision(&row.agent), receipt, &meta);
    if rebuilt == *row {
        return Vec::new();
    }
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(row), serde_json::to_value(&rebuilt))
    else {
        return vec!["?".into()];
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "`{k}` is {v}, its receipt says {}",
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect()
}

/// Checks each row against its own receipt, the checkpoints and the
/// receipt's signature; then finds the checkpointed rows that are gone.
fn check_rows(
    signers: &Signers,
    entries: &BTreeMap<u64, CheckpointEntry>,
    rows: Vec<DecisionRow>,
    filter: &Filter,
    report: &mut Report,
) {
    let last_checkpointed = entries.keys().next_back().copied().unwrap_or(0);
    // Decisions signed in a batch share a root: its signature is checked once.
    let roots = VerifiedRoots::default();
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        report.rows += 1;
        let seq = row.stream_seq;
        let key = key_of(&row);
        let bytes = rows::receipt_bytes(&row);
        let columns = altered_columns(&row, &bytes);
        if !columns.is_empty() {
            report.findings.push(Finding::Altered {
                seq,
                key: key.clone(),
                why: columns.join("; "),
            });
            seen.insert(seq);
            continue;
        }
        let signed = serde_json::from_slice::<DecisionReceipt>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                signers
                    .verify_receipt_cached(&r, Some(&roots))
                    .map_err(|e| e.to_string())
            });
        match entries.get(&seq) {
            Some(entry) if !same_key(&entry.key, &key, &row.decision) => {
                report.findings.push(Finding::Inserted {
                    seq,
                    key: key.clone(),
                    why: format!("the checkpoint has {} at that sequence", entry.key),
                });
                continue;
            }
            Some(entry) => {
                seen.insert(seq);
                if entry.leaf != sha256_hex(&bytes) {
                    report.findings.push(Finding::Altered {
                        seq,
                        key,
                        why: "its receipt is not the one checkpointed".into(),
                    });
                    continue;
                }
            }
            None if seq <= last_checkpointed => {
                report.findings.push(Finding::Inserted {
                    seq,
                    key,
                    why: "no checkpoint lists it, though later receipts are checkpointed".into(),
                });
                continue;
            }
            None => report.pending += 1,
        }
        if let Err(why) = signed {
            let checkpointed = entries.contains_key(&seq);
            report
                .findings
                .push(bad_signature(checkpointed, seq, key, &why));
        }
    }
    deleted_rows(entries, &seen, filter, report);
}

/// A row whose receipt signature does not verify: altered when its
/// sequence is checkpointed, inserted when not.
fn bad_signature(checkpointed: bool, seq: u64, key: String, why: &str) -> Finding {
    let why = format!("receipt signature: {why}");
    if checkpointed {
        Finding::Altered { seq, key, why }
    } else {
        Finding::Inserted { seq, key, why }
    }
}

/// A checkpointed receipt within `filter` that no row `seen` holds was
/// deleted.
fn deleted_rows(
    entries: &BTreeMap<u64, CheckpointEntry>,
    seen: &std::collections::HashSet<u64>,
    filter: &Filter,
    report: &mut Report,
) {
    for (seq, entry) in entries {
        if !seen.contains(seq) && filter.keeps(&entry.trace_id, &entry.decided_at) {
            report.findings.push(Finding::Deleted {
                seq: *seq,
                key: entry.key.clone(),
                trace_id: entry.trace_id.clone(),
                in_stream: false,
            });
        }
    }
}

/// What `meshctl audit repair` did.
#[derive(Debug, Default)]
pub(crate) struct Repair {
    /// Stream messages compared with their tables.
    pub(crate) compared: usize,
    /// Rows re-inserted (or, on a dry run, to re-insert), by table.
    pub(crate) reinserted: BTreeMap<&'static str, usize>,
    /// What could not be recovered, one line each.
    pub(crate) unrecoverable: Vec<String>,
    /// Rows still missing after the repair (0 unless ClickHouse refused).
    pub(crate) still_missing: usize,
}

/// Re-inserts every row the streams hold and the tables lack; names what
/// is past the streams' retention.
pub(crate) async fn repair(endpoints: &Endpoints, dry_run: bool) -> anyhow::Result<Repair> {
    let js = jetstream::new(endpoints.connect_nats().await?);
    let client = endpoints.audit_db();
    let mut out = Repair::default();
    let all = Filter::default();
    for pair in PAIRS {
        let gaps = gaps(&js, endpoints, pair, &all).await?;
        out.compared += gaps.compared;
        out.reinserted.insert(pair.table, gaps.missing.len());
        unrecoverable(endpoints, pair, gaps.first_seq, &mut out).await?;
        if dry_run || gaps.missing.is_empty() {
            continue;
        }
        if pair.table == audit_tables::schema::EVENTS {
            let mut insert = client.insert::<rows::EventRow>(pair.table).await?;
            for gap in &gaps.missing {
                if let Row::Event(row) = &gap.row {
                    insert.write(row).await?;
                }
            }
            insert
                .end()
                .await
                .with_context(|| format!("re-inserting into `{}`", pair.table))?;
        } else {
            let mut insert = client.insert::<DecisionRow>(pair.table).await?;
            for gap in &gaps.missing {
                if let Row::Decision(row) = &gap.row {
                    insert.write(row).await?;
                }
            }
            insert
                .end()
                .await
                .with_context(|| format!("re-inserting into `{}`", pair.table))?;
        }
        out.still_missing += gaps_after(&js, endpoints, pair).await?;
    }
    // Checkpointed decisions past MESH_DECISION's retention with no row:
    // named by the checkpoints, which outlive them.
    let kv = js
        .get_key_value(subjects::BUCKET_SIGNERS)
        .await
        .with_context(|| format!("opening `{}`", subjects::BUCKET_SIGNERS))?;
    let signers = Signers::new(crate::signers::records(&kv).await?);
    let mut scratch = Report::default();
    let entries = checkpoints(&js, &signers, &mut scratch).await?;
    let first = js
        .get_stream(subjects::STREAM_DECISION)
        .await?
        .info()
        .await?
        .state
        .first_sequence;
    let have = accounted(
        endpoints,
        Pair {
            stream: subjects::STREAM_DECISION,
            table: audit_tables::schema::DECISIONS,
        },
    )
    .await?;
    for (seq, entry) in entries.range(..first) {
        if !have.contains(seq) {
            out.unrecoverable.push(format!(
                "decision {} (MESH_DECISION seq {seq}, trace {}): checkpointed, no row, and past the stream's retention",
                entry.key, entry.trace_id
            ));
        }
    }
    Ok(out)
}

/// How many messages of `pair` still have no row.
async fn gaps_after(
    js: &jetstream::Context,
    endpoints: &Endpoints,
    pair: Pair,
) -> anyhow::Result<usize> {
    Ok(gaps(js, endpoints, pair, &Filter::default())
        .await?
        .missing
        .len())
}

/// The sequences of `pair.stream` before its first one (past its
/// retention) that have no row: counted, since their content is gone.
async fn unrecoverable(
    endpoints: &Endpoints,
    pair: Pair,
    first_seq: u64,
    out: &mut Repair,
) -> anyhow::Result<()> {
    if first_seq <= 1 || pair.table == audit_tables::schema::DECISIONS {
        // Decisions are named one by one from the checkpoints.
        return Ok(());
    }
    let have = accounted(endpoints, pair).await?;
    let gone = (1..first_seq).filter(|s| !have.contains(s)).count();
    if gone > 0 {
        out.unrecoverable.push(format!(
            "{gone} {} rows: {} sequences 1 to {} are past the stream's retention (or the table's TTL) and have no row",
            pair.table,
            pair.stream,
            first_seq - 1
        ));
    }
    Ok(())
}

/// Runs `meshctl audit …`; `false` when anything was found.
pub(crate) async fn run(command: AuditCommand, endpoints: &Endpoints) -> anyhow::Result<bool> {
    match command {
        AuditCommand::Repair { dry_run, output } => {
            let repaired = repair(endpoints, dry_run).await?;
            let ok = repaired.unrecoverable.is_empty() && repaired.still_missing == 0;
            if output.json() {
                crate::output::print_json(&serde_json::json!({
                    "ok": ok,
                    "dry_run": dry_run,
                    "compared": repaired.compared,
                    "reinserted": repaired.reinserted,
                    "still_missing": repaired.still_missing,
                    "unrecoverable": repaired.unrecoverable,
                }))?;
                return Ok(ok);
            }
            let total: usize = repaired.reinserted.values().sum();
            let by_table: Vec<String> = repaired
                .reinserted
                .iter()
                .map(|(table, n)| format!("{n} into {table}"))
                .collect();
            if total == 0 {
                outln!(
                    "nothing to repair: every message the streams hold has its row ({} compared)",
                    repaired.compared
                );
            } else if dry_run {
                outln!(
                    "would re-insert {total} rows from the streams ({}; {} messages compared)",
                    by_table.join(", "),
                    repaired.compared
                );
            } else {
                outln!(
                    "repaired: re-inserted {total} rows from the streams ({}; {} messages compared); {} still missing",
                    by_table.join(", "),
                    repaired.compared,
                    repaired.still_missing
                );
            }
            for line in &repaired.unrecoverable {
                outln!("could not recover: {line}");
            }
            Ok(ok)
        }
        AuditCommand::Verify {
            since,
            trace,
            output,
        } => {
            let now = chrono::Utc::now();
            let since_us = since
                .as_deref()
                .map(|s| {
                    crate::policy::parse_time(s, now)
                        .map(|t| t.timestamp_micros())
                        .map_err(|e| {
                            crate::exit::fail(crate::exit::Exit::Usage, format!("--since: {e:#}"))
                        })
                })
                .transpose()?;
            let filter = Filter { since_us, trace };
            let report = verify(endpoints, &filter).await?;
            if output.json() {
                crate::output::print_json(&serde_json::json!({
                    "ok": report.findings.is_empty(),
                    "decisions": report.rows,
                    "checkpoints": report.checkpoints,
                    "pending": report.pending,
                    "compared": report.compared,
                    "findings": report.findings,
                }))?;
                return Ok(report.findings.is_empty());
            }
            if report.findings.is_empty() {
                outln!(
                    "ok: {} decisions verified against {} checkpoints ({} newer than the last checkpoint: signature checked only); {} stream messages have their rows",
                    report.rows,
                    report.checkpoints,
                    report.pending,
                    report.compared
                );
                return Ok(true);
            }
            outln!(
                "FAILED: {} findings in {} decisions and {} checkpoints; first: {}",
                report.findings.len(),
                report.rows,
                report.checkpoints,
                report.findings[0]
            );
            for finding in &report.findings {
                outln!("  {finding}");
            }
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_decision_is_checkpointed_under_its_ingress_sequence() {
        assert!(same_key("planner/e-1", "planner/e-1", "allow"));
        assert!(same_key("invalid-2", "planner/e-1", "invalid"));
        assert!(!same_key("invalid-2", "planner/e-1", "allow"));
        assert!(!same_key("invalid-x", "planner/e-1", "invalid"));
        assert!(!same_key("coder/e-1", "planner/e-1", "invalid"));
    }

    #[test]
    fn a_deleted_row_says_whether_the_stream_can_restore_it() {
        let deleted = |in_stream| Finding::Deleted {
            seq: 7,
            key: "planner/e".into(),
            trace_id: "t".into(),
            in_stream,
        };
        assert!(
            deleted(true)
                .to_string()
                .ends_with("`meshctl audit repair` re-inserts it")
        );
        assert!(deleted(false).to_string().ends_with("not recoverable"));
        let missing = Finding::Missing {
            table: "events",
            stream: "MESH_INGRESS",
            seq: 3,
            key: "planner/e".into(),
        };
        assert_eq!(
            missing.to_string(),
            "missing: events row of planner/e (MESH_INGRESS seq 3): the stream holds it, the table does not (`meshctl audit repair` re-inserts it)"
        );
        assert!(missing.order() > deleted(true).order());
    }

    #[test]
    fn docs_show_what_verify_and_repair_print() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/audit.md"),
        )
        .unwrap_or_default();
        let missing = Finding::Missing {
            table: "events",
            stream: subjects::STREAM_INGRESS,
            seq: 7,
            key: "planner/e-7".into(),
        };
        for printed in [
            missing.to_string().as_str(),
            "; the stream still holds it: `meshctl audit repair` re-inserts it",
            "; past the stream's retention: not recoverable",
            "repaired: re-inserted",
            "nothing to repair: every message the streams hold has its row",
            "could not recover: ",
            "checkpointed, no row, and past the stream's retention",
            "are past the stream's retention (or the table's TTL) and have no row",
            "stream messages have their rows",
        ] {
            assert!(
                docs.contains(printed),
                "docs/audit.md does not show `{printed}`"
            );
        }
    }
}

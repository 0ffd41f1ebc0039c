//! `meshctl policy`: check a policy directory the way the worker loads it,
//! promote the shadow set to the active one, and replay recorded events
//! (from ClickHouse or JetStream) against a candidate set to see what would
//! change before enforcing it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use audit_tables::queries;
use audit_tables::rows::{self, DecisionRow, EventRow};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use policy_engine::{
    AgentCards, CACHE_FILE, ENTITIES_FILE, FLOWS_FILE, Outcome, PROPERTIES_FILE, PolicyBundle,
    Properties, Replayer, SCHEMA_FILE,
};
use schemas::{DecisionReceipt, subjects};
use serde::Serialize;

use crate::servers::Endpoints;

/// `meshctl policy ...`
#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate a policy directory as the worker loads it and print its hash.
    Check {
        /// The policy directory.
        dir: PathBuf,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Prove the claims of the directory's `properties.toml` with the cvc5 SMT solver, or show a request that refutes each.
    Prove {
        /// The policy directory (with `properties.toml`).
        #[arg(default_value = "policies")]
        dir: PathBuf,
        #[command(flatten)]
        solver: crate::prove::SolverArgs,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// List the policies NEW adds, removes and changes; with --prove, whether NEW allows only what OLD allowed.
    Diff {
        /// The policy directory before the change.
        old: PathBuf,
        /// The policy directory after the change.
        new: PathBuf,
        /// Prove whether NEW is equivalent to OLD or narrows it (exit 1 when NEW allows a request OLD denied).
        #[arg(long)]
        prove: bool,
        #[command(flatten)]
        solver: crate::prove::SolverArgs,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Make the shadow set the active one (each file replaced atomically; a running worker reloads it).
    Promote {
        /// The shadow policy directory.
        #[arg(long, env = "AGENTMESH_SHADOW_POLICIES")]
        shadow: PathBuf,
        /// The active policy directory, replaced by the shadow set.
        #[arg(long, env = "AGENTMESH_POLICIES", default_value = "policies")]
        policies: PathBuf,
        /// Copy the replaced active files into this directory first.
        #[arg(long)]
        backup: Option<PathBuf>,
    },
    /// Decide recorded events again with a candidate set and print what would change.
    Replay {
        /// The candidate policy directory.
        #[arg(long)]
        policies: PathBuf,
        /// Start of the range: RFC 3339, `YYYY-MM-DD[ HH:MM:SS]` (UTC), or an age such as `30m`, `6h`, `1h30m`, `2d`.
        #[arg(long)]
        since: String,
        /// End of the range (same forms; default now).
        #[arg(long)]
        until: Option<String>,
        /// Where the recorded events and decisions come from.
        #[arg(long, value_enum, default_value_t = Source::Clickhouse)]
        from: Source,
        /// The agent cards whose input schemas tool calls' arguments are checked against first, as the worker checks them: `current` reads every card in `mesh-agents` now (NATS needed also with `--from clickhouse`), `none` checks no arguments. Unset: `current`, or `none` with a warning when NATS cannot be reached.
        #[arg(long, value_enum)]
        cards: Option<CardsFrom>,
        /// Examples printed per kind of change.
        #[arg(long, default_value_t = 5)]
        examples: usize,
        #[command(flatten)]
        output: crate::output::OutputArg,
        /// The report as JSON (the older spelling of `-o json`).
        #[arg(long, hide = true)]
        json: bool,
        /// Exit with status 1 when any decision would change (for CI).
        #[arg(long)]
        fail_on_change: bool,
    },
}

/// Where replay reads recorded events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Source {
    /// The audit tables (`events` and `decisions`).
    Clickhouse,
    /// The `MESH_INGRESS` and `MESH_DECISION` streams.
    Jetstream,
}

/// Which agent cards replay checks tool calls' arguments against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CardsFrom {
    /// The cards in `mesh-agents` now (not as they were when the events were decided).
    Current,
    /// None: no call's arguments are checked.
    #[value(name = "none")]
    Unchecked,
}

/// Runs a `meshctl policy` command; `Ok(false)` means exit status 1.
pub(crate) async fn run(command: PolicyCommand, endpoints: &Endpoints) -> anyhow::Result<bool> {
    match command {
        PolicyCommand::Check { dir, output } => {
            let bundle = load(&dir)?;
            let properties = Properties::load(&dir, bundle.schema(), bundle.entities())
                .with_context(|| format!("properties in `{}` refused", dir.display()))?
                .map_or(0, |p| p.properties.len());
            if output.json() {
                crate::output::print_json(&serde_json::json!({
                    "dir": dir.display().to_string(),
                    "policies": bundle.len(),
                    "policy_hash": bundle.hash(),
                    "require_approval": bundle.guard().approval_policies().collect::<Vec<_>>(),
                    "reads_detectors": bundle.guard().reads_detectors(),
                    "reads_counters": bundle.guard().reads_counters(),
                    "properties": properties,
                }))?;
                return Ok(true);
            }
            outln!(
                "{}: {} policies, policy hash {}",
                dir.display(),
                bundle.len(),
                bundle.hash()
            );
            let approvals: Vec<&str> = bundle.guard().approval_policies().collect();
            if !approvals.is_empty() {
                outln!("  require approval: {}", approvals.join(", "));
            }
            if bundle.guard().reads_detectors() {
                outln!("  reads payload detectors (context.detectors)");
            }
            if bundle.guard().reads_counters() {
                outln!("  reads rate and budget counters (context.rate, context.budget)");
            }
            if properties > 0 {
                outln!(
                    "  {properties} properties in {PROPERTIES_FILE} (`meshctl policy prove` proves them)"
                );
            }
            Ok(true)
        }
        PolicyCommand::Prove {
            dir,
            solver,
            output,
        } => crate::prove::prove(&dir, &solver, output.json()).await,
        PolicyCommand::Diff {
            old,
            new,
            prove,
            solver,
            output,
        } => crate::prove::diff(&old, &new, prove, &solver, output.json()).await,
        PolicyCommand::Promote {
            shadow,
            policies,
            backup,
        } => {
            promote(&shadow, &policies, backup.as_deref())?;
            Ok(true)
        }
        PolicyCommand::Replay {
            policies,
            since,
            until,
            from,
            cards,
            examples,
            output,
            json,
            fail_on_change,
        } => {
            let json = json || output.json();
            let now = Utc::now();
            let since = parse_time(&since, now)?;
            let until = until
                .map(|u| parse_time(&u, now))
                .transpose()?
                .unwrap_or(now);
            if since >= until {
                bail!("--since {since} is not before --until {until}");
            }
            let mut replayer = Replayer::new(load(&policies)?, schemas::Limits::default());
            match cards {
                Some(CardsFrom::Current) => {
                    replayer = replayer.with_cards(read_cards(endpoints).await?);
                }
                Some(CardsFrom::Unchecked) => {}
                // Unset: a replay that needs no NATS otherwise still runs
                // without it, saying so.
                None => match read_cards(endpoints).await {
                    Ok(read) => replayer = replayer.with_cards(read),
                    Err(error) => errln!(
                        "warning: {error:#}; replaying without checking tool calls' arguments (`--cards current` makes this an error)"
                    ),
                },
            }
            let mut report = Report::new(examples);
            match from {
                Source::Clickhouse => {
                    replay_clickhouse(endpoints, &replayer, since, until, &mut report).await?
                }
                Source::Jetstream => {
                    replay_jetstream(endpoints, &replayer, since, until, &mut report).await?
                }
            }
            let header = Header {
                source: match from {
                    Source::Clickhouse => format!("ClickHouse `{}`", endpoints.database),
                    Source::Jetstream => format!("JetStream `{}`", subjects::STREAM_INGRESS),
                },
                since: since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                until: until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                policies: policies.display().to_string(),
                policy_hash: replayer.bundle().hash().to_owned(),
                cards: replayer.cards().map(|c| CardsRead {
                    agents: c.len(),
                    tools: c.tools_with_schema(),
                    unreadable: c.unreadable(),
                }),
            };
            let mut out = crate::output::stdout();
            if json {
                serde_json::to_writer_pretty(&mut out, &report.json(&header))?;
                writeln!(out)?;
            } else {
                report.print(&header, &mut out)?;
            }
            Ok(!(fail_on_change && report.changed() > 0))
        }
    }
}

fn load(dir: &Path) -> anyhow::Result<PolicyBundle> {
    PolicyBundle::load(dir).with_context(|| format!("policies in `{}` refused", dir.display()))
}

/// Parses an RFC 3339 time, `YYYY-MM-DD[ HH:MM:SS]` in UTC, or an age
/// (`90s`, `30m`, `6h`, `2d`) before `now`.
pub(crate) fn parse_time(text: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    let t = text.trim();
    // An age, in meshctl's one duration syntax (`90s`, `30m`, `1h30m`, `2d`).
    if t.ends_with(|c: char| c.is_ascii_alphabetic())
        && let Ok(age) = humantime::parse_duration(t)
    {
        // An age too large for a date is refused, not a panic.
        if let Some(t) = chrono::Duration::from_std(age)
            .ok()
            .and_then(|age| now.checked_sub_signed(age))
        {
            return Ok(t);
        }
        bail!("`{text}` is too long ago to be a time");
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.with_timezone(&Utc));
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S") {
        return Ok(dt.and_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    bail!(
        "`{text}` is not a time: use RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC) or an age like `30m`, `6h`, `2d`"
    )
}

/// The files a policy directory is made of: its policies, schema and
/// entities, the cache and flow rules (both in the policy hash) and the
/// properties `policy prove` checks.
fn policy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    const WITH_THE_POLICIES: [&str; 5] = [
        SCHEMA_FILE,
        ENTITIES_FILE,
        CACHE_FILE,
        FLOWS_FILE,
        PROPERTIES_FILE,
    ];
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading `{}`", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && (p.extension().is_some_and(|e| e == "cedar")
                    || p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| WITH_THE_POLICIES.contains(&n)))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Copies the shadow set over the active one: every file is written to a
/// temporary name in the active directory and renamed into place (atomic
/// per file), then active policy files the shadow set lacks are removed.
/// The worker reloads once the directory has been quiet for a moment, so it
/// loads the whole new set; were it to look in between, it would refuse a
/// mixed set and keep the old one.
fn promote(shadow: &Path, active: &Path, backup: Option<&Path>) -> anyhow::Result<()> {
    let new = load(shadow)?;
    let old_hash = PolicyBundle::load(active).ok().map(|b| b.hash().to_owned());
    if old_hash.as_deref() == Some(new.hash()) {
        outln!(
            "`{}` already holds the shadow set (policy hash {}); nothing to promote.",
            active.display(),
            new.hash()
        );
        return Ok(());
    }
    std::fs::create_dir_all(active).with_context(|| format!("creating `{}`", active.display()))?;
    let current = policy_files(active)?;
    if let Some(backup) = backup {
        std::fs::create_dir_all(backup)
            .with_context(|| format!("creating `{}`", backup.display()))?;
        for file in &current {
            let to = backup.join(file.file_name().unwrap_or_default());
            std::fs::copy(file, &to)
                .with_context(|| format!("backing up to `{}`", to.display()))?;
        }
    }
    let incoming = policy_files(shadow)?;
    let mut staged = Vec::new();
    for file in &incoming {
        let name = file.file_name().unwrap_or_default();
        let tmp = active.join(format!(".promote-{}.tmp", name.to_string_lossy()));
        let bytes = std::fs::read(file).with_context(|| format!("reading `{}`", file.display()))?;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing `{}`", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        staged.push((tmp, active.join(name)));
    }
    for (tmp, to) in &staged {
        std::fs::rename(tmp, to).with_context(|| format!("replacing `{}`", to.display()))?;
    }
    for file in current {
        let name = file.file_name().unwrap_or_default();
        if !incoming.iter().any(|i| i.file_name() == Some(name)) {
            std::fs::remove_file(&file)
                .with_context(|| format!("removing `{}`", file.display()))?;
        }
    }
    let now_active = load(active)?;
    if now_active.hash() != new.hash() {
        bail!(
            "`{}` now has policy hash {}, not the shadow set's {}: was it changed meanwhile?",
            active.display(),
            now_active.hash(),
            new.hash()
        );
    }
    outln!(
        "Promoted `{}` to `{}`: policy hash {} (was {}).",
        shadow.display(),
        active.display(),
        new.hash(),
        old_hash.as_deref().unwrap_or("none")
    );
    outln!(
        "A running policy worker reloads it within a second; receipts then carry policy_hash {}.",
        new.hash()
    );
    Ok(())
}

/// What the report header says about the replay.
struct Header {
    source: String,
    since: String,
    until: String,
    policies: String,
    policy_hash: String,
    /// The cards tool calls were checked against (`None`: `--cards none`).
    cards: Option<CardsRead>,
}

/// What was read of `mesh-agents` for the replay.
struct CardsRead {
    /// Cards that parse.
    agents: usize,
    /// Their tools with an input schema.
    tools: usize,
    /// Cards that do not parse (they check nothing, as in the worker).
    unreadable: usize,
}

/// Every card in `mesh-agents` now, compiled: what the worker checks tool
/// calls against.
async fn read_cards(endpoints: &Endpoints) -> anyhow::Result<AgentCards> {
    let bucket = subjects::BUCKET_AGENTS;
    let hint = "(`--cards none` replays without checking tool calls' arguments against them)";
    let client = endpoints
        .connect_nats()
        .await
        .with_context(|| format!("reading the agent cards in `{bucket}` {hint}"))?;
    let js = jetstream::new(client);
    let read = async {
        let kv = js.get_key_value(bucket).await?;
        let mut cards = AgentCards::new();
        let mut keys = kv.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(card) = kv.get(&key).await?
                && let Err(error) = cards.insert(&key, &card)
            {
                tracing::warn!(agent = %key, %error, "The agent's card does not parse; its tool calls are not checked against an input schema (as in the worker).");
            }
        }
        anyhow::Ok(cards)
    };
    read.await
        .with_context(|| format!("reading the agent cards in `{bucket}` {hint}"))
}

/// One changed decision, for the examples.
#[derive(Debug, Clone, Serialize)]
struct Example {
    event_id: String,
    trace_id: String,
    agent: String,
    r#type: String,
    target: String,
    subject: String,
    recorded: String,
    recorded_reasons: Vec<String>,
    candidate: String,
    candidate_reasons: Vec<String>,
    candidate_errors: Vec<String>,
}

/// Counts and examples of a replay.
struct Report {
    examples_per_change: usize,
    events: u64,
    unrecorded: u64,
    recorded_hashes: BTreeMap<String, u64>,
    transitions: BTreeMap<(String, String), u64>,
    examples: BTreeMap<(String, String), Vec<Example>>,
}

/// What one recorded event looked like, whichever the source.
struct Recorded<'a> {
    event_id: &'a str,
    trace_id: &'a str,
    agent: &'a str,
    r#type: &'a str,
    target: &'a str,
    subject: &'a str,
    receipt: Option<&'a DecisionReceipt>,
}

impl Report {
    fn new(examples_per_change: usize) -> Self {
        Self {
            examples_per_change,
            events: 0,
            unrecorded: 0,
            recorded_hashes: BTreeMap::new(),
            transitions: BTreeMap::new(),
            examples: BTreeMap::new(),
        }
    }

    fn add(&mut self, recorded: Recorded<'_>, replayed: policy_engine::Replayed) {
        self.events += 1;
        let Some(receipt) = recorded.receipt else {
            self.unrecorded += 1;
            return;
        };
        *self
            .recorded_hashes
            .entry(receipt.policy_hash.clone())
            .or_default() += 1;
        let was = Outcome::of_receipt(receipt).as_str().to_owned();
        let now = replayed.outcome.as_str().to_owned();
        let key = (was.clone(), now.clone());
        *self.transitions.entry(key.clone()).or_default() += 1;
        if was != now {
            let list = self.examples.entry(key).or_default();
            if list.len() < self.examples_per_change {
                list.push(Example {
                    event_id: recorded.event_id.to_owned(),
                    trace_id: recorded.trace_id.to_owned(),
                    agent: recorded.agent.to_owned(),
                    r#type: recorded.r#type.to_owned(),
                    target: recorded.target.to_owned(),
                    subject: recorded.subject.to_owned(),
                    recorded: was,
                    recorded_reasons: receipt.reasons.clone(),
                    candidate: now,
                    candidate_reasons: replayed.reasons,
                    candidate_errors: replayed.errors,
                });
            }
        }
    }

    fn changed(&self) -> u64 {
        self.transitions
            .iter()
            .filter(|((a, b), _)| a != b)
            .map(|(_, n)| n)
            .sum()
    }

    fn unchanged(&self) -> u64 {
        self.transitions
            .iter()
            .filter(|((a, b), _)| a == b)
            .map(|(_, n)| n)
            .sum()
    }

    fn json(&self, h: &Header) -> serde_json::Value {
        serde_json::json!({
            "source": h.source,
            "since": h.since,
            "until": h.until,
            "policies": h.policies,
            "policy_hash": h.policy_hash,
            "cards": h.cards.as_ref().map(|c| serde_json::json!({
                "bucket": subjects::BUCKET_AGENTS,
                "agents": c.agents,
                "tools_with_input_schema": c.tools,
                "unreadable": c.unreadable,
            })),
            "events": self.events,
            "without_recorded_decision": self.unrecorded,
            "unchanged": self.unchanged(),
            "changed": self.changed(),
            "recorded_policy_hashes": self.recorded_hashes,
            "transitions": self.transitions.iter()
                .map(|((a, b), n)| serde_json::json!({"recorded": a, "candidate": b, "events": n}))
                .collect::<Vec<_>>(),
            "examples": self.examples.values().flatten().collect::<Vec<_>>(),
        })
    }

    fn print(&self, h: &Header, out: &mut impl std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "Replayed {} events from {} ({} – {}) against `{}` (policy hash {}).",
            self.events, h.source, h.since, h.until, h.policies, h.policy_hash
        )?;
        if !self.recorded_hashes.is_empty() {
            let hashes: Vec<String> = self
                .recorded_hashes
                .iter()
                .map(|(hash, n)| format!("{hash} ({n})"))
                .collect();
            writeln!(out, "Recorded under policy hash {}.", hashes.join(", "))?;
        }
        match &h.cards {
            Some(c) => {
                write!(
                    out,
                    "Tool calls checked against the input schemas of {} agent cards in `{}` as they are now ({} tools)",
                    c.agents,
                    subjects::BUCKET_AGENTS,
                    c.tools
                )?;
                if c.unreadable > 0 {
                    write!(
                        out,
                        "; {} cards that do not parse check nothing",
                        c.unreadable
                    )?;
                }
                writeln!(out, ".")?;
            }
            None => writeln!(
                out,
                "Tool calls' arguments not checked against input schemas (`--cards none`, or no NATS to read the cards from)."
            )?,
        }
        writeln!(out, "  unchanged  {:>6}", self.unchanged())?;
        writeln!(out, "  changed    {:>6}", self.changed())?;
        for ((a, b), n) in &self.transitions {
            if a != b {
                writeln!(out, "    {:<22} {n:>6}", format!("{a} → {b}"))?;
            }
        }
        if self.unrecorded > 0 {
            writeln!(
                out,
                "  no recorded decision {:>6} (not decided yet, or the receipt is outside the range)",
                self.unrecorded
            )?;
        }
        if self.changed() > 0 {
            writeln!(out, "\nExamples of changed decisions:")?;
            for ((a, b), list) in &self.examples {
                for e in list {
                    let mut what = format!(
                        "{} {}",
                        e.agent,
                        e.r#type
                            .strip_prefix(schemas::TYPE_PREFIX)
                            .unwrap_or(&e.r#type)
                    );
                    if !e.subject.is_empty() {
                        what.push(' ');
                        what.push_str(&e.subject);
                    }
                    if !e.target.is_empty() {
                        what.push_str(" → ");
                        what.push_str(&e.target);
                    }
                    writeln!(out, "  {:<20} {what}", format!("{a} → {b}"))?;
                    writeln!(out, "      event {}  trace {}", e.event_id, e.trace_id)?;
                    writeln!(out, "      recorded:  {}", reasons(&e.recorded_reasons))?;
                    let mut candidate = reasons(&e.candidate_reasons);
                    if !e.candidate_errors.is_empty() {
                        candidate.push_str(&format!("  errors: {}", e.candidate_errors.join("; ")));
                    }
                    writeln!(out, "      candidate: {candidate}")?;
                }
            }
        } else {
            writeln!(out, "\nNo decision would change.")?;
        }
        Ok(())
    }
}

fn reasons(r: &[String]) -> String {
    if r.is_empty() {
        "(no policy)".to_owned()
    } else {
        r.join(", ")
    }
}

fn micros(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_micros()).unwrap_or(0)
}

async fn replay_clickhouse(
    endpoints: &Endpoints,
    replayer: &Replayer,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    report: &mut Report,
) -> anyhow::Result<()> {
    // The events table's own row type (audit-tables), and the receipts of
    // those events (audit_tables::queries::replay_*).
    let (from, to) = (micros(since), micros(until));
    let receipts = receipts_of_events(endpoints, from, to).await?;
    let sql = queries::replay_events(from, to);
    let mut cursor = endpoints
        .audit_db()
        .query(&sql)
        .fetch::<EventRow>()
        .context("reading recorded events from ClickHouse")?;
    while let Some(row) = cursor
        .next()
        .await
        .with_context(|| format!("reading `{}.events` from ClickHouse", endpoints.database))?
    {
        let receipt = receipts.get(&(row.agent.clone(), row.event_id.clone()));
        let at = i64::try_from(row.received_us / 1_000_000).unwrap_or(0);
        let replayed = match audit_tables::rows::rebuild_event(&row) {
            Ok((headers, payload)) => {
                replayer.replay_message(&row.ingress_subject, Some(&headers), &payload, at)
            }
            Err(e) => policy_engine::Replayed {
                outcome: Outcome::Invalid,
                reasons: Vec::new(),
                errors: vec![format!("{e:#}")],
                findings: Vec::new(),
            },
        };
        report.add(
            Recorded {
                event_id: &row.event_id,
                trace_id: &row.trace_id,
                agent: &row.agent,
                r#type: &row.r#type,
                target: &row.target,
                subject: &row.subject,
                receipt,
            },
            replayed,
        );
    }
    Ok(())
}

/// The receipts recorded for the events received in `[from, to)`
/// (microseconds), by agent and event id; rows whose receipt does not parse
/// are left out.
async fn receipts_of_events(
    endpoints: &Endpoints,
    from: u64,
    to: u64,
) -> anyhow::Result<HashMap<(String, String), DecisionReceipt>> {
    let sql = queries::replay_receipts(from, to);
    let rows = endpoints
        .audit_db()
        .query(&sql)
        .fetch_all::<DecisionRow>()
        .await
        .with_context(|| format!("reading `{}.decisions` from ClickHouse", endpoints.database))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let receipt = serde_json::from_slice(&rows::receipt_bytes(&row)).ok()?;
            Some(((row.agent, row.event_id), receipt))
        })
        .collect())
}

/// Every message of `stream` stored from `since` up to its last message
/// now, in order, with the time the broker stored it (microseconds).
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    since: DateTime<Utc>,
) -> anyhow::Result<Vec<(async_nats::jetstream::Message, i64)>> {
    let mut s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("stream `{stream}`"))?;
    let last = s.info().await?.state.last_sequence;
    let start_time = time::OffsetDateTime::from_unix_timestamp(since.timestamp())
        .context("--since out of range")?;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .with_context(|| format!("reading `{stream}`"))?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let Ok(Some(message)) = next else { break };
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let at = i64::try_from(info.published.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX);
        let seq = info.stream_sequence;
        out.push((message, at));
        if seq >= last {
            break;
        }
    }
    Ok(out)
}

async fn replay_jetstream(
    endpoints: &Endpoints,
    replayer: &Replayer,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let client = endpoints.connect_nats().await?;
    let js = jetstream::new(client);
    // Keyed by agent + event id, as events are: two agents may use one id.
    let mut receipts: HashMap<String, DecisionReceipt> = HashMap::new();
    for (message, _) in read_stream(&js, subjects::STREAM_DECISION, since).await? {
        if let Ok(r) = serde_json::from_slice::<DecisionReceipt>(&message.payload)
            && !r.event_id.is_empty()
        {
            receipts.insert(subjects::event_key(&r.agent, &r.event_id), r);
        }
    }
    for (message, at_us) in read_stream(&js, subjects::STREAM_INGRESS, since).await? {
        if at_us >= until.timestamp_micros() {
            break;
        }
        let at = at_us.div_euclid(1_000_000);
        let Ok(event) = schemas::MeshEvent::from_message(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            schemas::Limits::default(),
        ) else {
            // Invalid whatever the policies say: not replayed.
            continue;
        };
        let step = subjects::parse_ingress(&message.subject).map_or("", |p| p.step);
        let replayed = replayer.replay_event(&event, step, at);
        let id = event.id().to_owned();
        let trace_id = event.trace.trace_id_hex();
        let target = event
            .target
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let subject = schemas::AttributesReader::subject(&event.event)
            .unwrap_or_default()
            .to_owned();
        report.add(
            Recorded {
                event_id: &id,
                trace_id: &trace_id,
                agent: event.agent.as_str(),
                r#type: event.event_type.as_str(),
                target: &target,
                subject: &subject,
                receipt: receipts.get(&subjects::event_key(event.agent.as_str(), &id)),
            },
            replayed,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = |s: &str| parse_time(s, now).unwrap().to_rfc3339();
        assert_eq!(t("30m"), "2026-03-01T11:30:00+00:00");
        assert_eq!(t("2d"), "2026-02-27T12:00:00+00:00");
        assert_eq!(t("90s"), "2026-03-01T11:58:30+00:00");
        assert_eq!(t("2026-02-01T10:00:00+02:00"), "2026-02-01T08:00:00+00:00");
        assert_eq!(t("2026-02-01 10:00:00"), "2026-02-01T10:00:00+00:00");
        assert_eq!(t("2026-02-01"), "2026-02-01T00:00:00+00:00");
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("5x", now).is_err());
        assert_eq!(t("1h30m"), "2026-03-01T10:30:00+00:00");
        assert!(parse_time("99999999999999999d", now).is_err());
        assert!(parse_time("9223372036854775807s", now).is_err());
    }
}

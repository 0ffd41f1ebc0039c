//! The audit DDL and every shipped query on current ClickHouse: the engine
//! of PyPI's `chdb-core` (pinned in `scripts/install-deps.sh`), run in
//! process by `current_clickhouse.py` with testkit's Python. The DDL is the
//! one [`schema::ddl`] generates for that version plus the migration
//! statements of `schema::ensure` (added columns, retention), the rows come from
//! [`rows::event_row`] and [`rows::decision_row`], and the queries are
//! rendered by [`queries::render`], as `meshctl` and the docs bind them, and
//! once more with ClickHouse binding the `{name:Type}` parameters itself.
//! (ClickHouse 18.16, Debian's, runs the same queries in
//! `audit-sink/tests/it/queries.rs`.)

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use async_nats::HeaderMap;
use audit_tables::{queries, rows, schema};
use schemas::{
    Approval, ApprovalStatus, CacheStatus, Decision, DecisionReceipt, TraceParent, subjects,
};
use serde_json::{Value, json};

/// The first step's time: an hour ago, so the 30-day retention (`TTL`) the
/// tables are created with keeps every row.
static T0: std::sync::LazyLock<i64> =
    std::sync::LazyLock::new(|| chrono::Utc::now().timestamp() - 3600);

fn at(offset: i64) -> String {
    chrono::DateTime::from_timestamp(*T0 + offset, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn meta(seq: u64, offset: i64) -> rows::Meta {
    rows::Meta {
        stream: "MESH_INGRESS".into(),
        stream_seq: seq,
        received_us: (*T0 + offset) * 1_000_000,
    }
}

/// A structured-mode CloudEvent published by `agent`.
struct Step {
    id: &'static str,
    agent: &'static str,
    ty: &'static str,
    parent: Option<&'static str>,
    tool: Option<&'static str>,
    offset: i64,
}

impl Step {
    fn event(&self, trace: &TraceParent, seq: u64) -> rows::EventRow {
        let mut event = json!({
            "specversion": "1.0",
            "id": self.id,
            "source": format!("/agents/{}", self.agent),
            "type": self.ty,
            "time": at(self.offset),
            "traceparent": trace.child().to_string(),
            "datacontenttype": "application/json",
            "data": {"step": self.id},
        });
        if let Some(p) = self.parent {
            event["causationid"] = json!(p);
        }
        if let Some(t) = self.tool {
            event["subject"] = json!(t);
        }
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/cloudevents+json");
        let payload = event.to_string().into_bytes();
        rows::event_row(
            &subjects::ingress(self.agent, "step"),
            Some(&headers),
            &payload,
            &meta(seq, self.offset),
        )
    }

    fn receipt(
        &self,
        trace: &TraceParent,
        decision: Decision,
        reasons: &[&str],
    ) -> DecisionReceipt {
        DecisionReceipt {
            event_id: self.id.into(),
            trace_id: trace.trace_id_hex(),
            decision,
            reasons: reasons.iter().map(|s| s.to_string()).collect(),
            policy_hash: "active-hash".into(),
            decision_id: format!("d-{}", self.id),
            agent: self.agent.into(),
            event_type: self.ty.into(),
            subject: self.tool.map(str::to_owned),
            causation_id: self.parent.map(str::to_owned),
            decided_at: at(self.offset),
            eval_micros: 100 + self.offset.unsigned_abs() * 10,
            ingress_subject: subjects::ingress(self.agent, "step"),
            ..Default::default()
        }
    }
}

fn decision(receipt: &DecisionReceipt, seq: u64, offset: i64) -> anyhow::Result<rows::DecisionRow> {
    let payload = serde_json::to_vec(receipt)?;
    Ok(rows::decision_row(
        &subjects::decision(&receipt.agent),
        &payload,
        &meta(seq, offset),
    ))
}

fn lines<R: serde::Serialize>(rows: &[R]) -> serde_json::Result<Vec<String>> {
    rows.iter().map(serde_json::to_string).collect()
}

/// Runs the job on chdb; fails naming the install command when it is missing.
fn run_on_chdb(job: &Value) -> anyhow::Result<Value> {
    let python = testkit::python();
    let script = testkit::workspace().join("audit-sink/tests/it/current_clickhouse.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {python} (run ./scripts/install-deps.sh)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(job)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{python} {}: {}\n(current ClickHouse comes from PyPI chdb-core: ./scripts/install-deps.sh installs it into .agentmesh/venv)",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reading the script's output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn col(rows: &Value, name: &str) -> Vec<String> {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    rows.iter()
        .map(|r| match &r[name] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn ddl_rows_and_every_shipped_query_run_on_current_clickhouse() -> anyhow::Result<()> {
    let trace = TraceParent::mint();
    let prompt = Step {
        id: "p1",
        agent: "planner",
        ty: "io.agentmesh.prompt",
        parent: None,
        tool: None,
        offset: 0,
    };
    let search = Step {
        id: "c1",
        agent: "coder",
        ty: "io.agentmesh.tool.call",
        parent: Some("p1"),
        tool: Some("code.search"),
        offset: 1,
    };
    let shell = Step {
        id: "c2",
        agent: "coder",
        ty: "io.agentmesh.tool.call",
        parent: Some("p1"),
        tool: Some("shell.exec"),
        offset: 2,
    };
    let deploy = Step {
        id: "c3",
        agent: "coder",
        ty: "io.agentmesh.tool.call",
        parent: Some("p1"),
        tool: Some("deploy.run"),
        offset: 3,
    };
    let steps = [&prompt, &search, &shell, &deploy];

    let mut events: Vec<rows::EventRow> = steps
        .iter()
        .zip(1..)
        .map(|(s, seq)| s.event(&trace, seq))
        .collect();
    assert!(events.iter().all(|e| e.valid == 1), "{events:?}");
    // An event that is no CloudEvent: stored with valid = 0.
    let bad = rows::event_row(
        &subjects::ingress("coder", "step"),
        None,
        b"not a cloud event",
        &meta(9, 4),
    );
    assert_eq!(bad.valid, 0);
    events.push(bad.clone());

    let mut allowed = prompt.receipt(&trace, Decision::Allow, &["members-record-steps"]);
    allowed.shadow_decision = Some(Decision::Allow);
    let mut cached = search.receipt(&trace, Decision::Allow, &["members-call-low-risk-tools"]);
    cached.cache = Some(CacheStatus::Hit);
    cached.cache_source = Some("coder/c0".into());
    // Denied by the active set; the shadow set would allow it.
    let mut denied = shell.receipt(&trace, Decision::Deny, &["forbid-shell-exec"]);
    denied.shadow_decision = Some(Decision::Allow);
    denied.shadow_reasons = vec!["shadow-allows-shell".into()];
    denied.shadow_policy_hash = Some("shadow-hash".into());
    let mut approved = deploy.receipt(&trace, Decision::Allow, &["deploys-need-approval"]);
    approved.approval = Some(Approval {
        id: "a-1".into(),
        status: ApprovalStatus::Approved,
        approver: "alice".into(),
        comment: "ok to ship".into(),
        requested_at: at(3),
        answered_at: at(4),
    });
    let invalid = DecisionReceipt {
        event_id: bad.event_id.clone(),
        trace_id: bad.trace_id.clone(),
        decision: Decision::Invalid,
        errors: vec![bad.error.clone()],
        decision_id: "d-bad".into(),
        agent: "coder".into(),
        decided_at: at(4),
        eval_micros: 5,
        ingress_subject: subjects::ingress("coder", "step"),
        ..Default::default()
    };
    let decisions: Vec<rows::DecisionRow> = [&allowed, &cached, &denied, &approved, &invalid]
        .into_iter()
        .zip(1..)
        .map(|(r, seq)| decision(r, seq, i64::try_from(seq)?))
        .collect::<anyhow::Result<_>>()?;

    let params: BTreeMap<String, String> = [
        ("trace_id", trace.trace_id_hex()),
        ("from", at(0)),
        ("to", at(600)),
        ("limit", "10".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut rendered = serde_json::Map::new();
    let mut native = serde_json::Map::new();
    // The same range as UTC wall-clock times, the form ClickHouse binds.
    let wall = |offset: i64| {
        chrono::DateTime::from_timestamp(*T0 + offset, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    let mut bound = params.clone();
    bound.insert("from".into(), wall(0));
    bound.insert("to".into(), wall(600));
    // `meshctl policy replay`'s reads, with `?fields` filled in as the
    // `clickhouse` crate fills it: the row type's columns.
    let fields = |names: &[&str]| {
        names
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (from_us, to_us) = (
        (*T0 - 1).unsigned_abs() * 1_000_000,
        (*T0 + 600).unsigned_abs() * 1_000_000,
    );
    rendered.insert(
        "replay_events".into(),
        json!(queries::replay_events(from_us, to_us).replace(
            "?fields",
            &fields(<rows::EventRow as clickhouse::Row>::COLUMN_NAMES)
        )),
    );
    rendered.insert(
        "replay_receipts".into(),
        json!(queries::replay_receipts(from_us, to_us).replace(
            "?fields",
            &fields(<rows::DecisionRow as clickhouse::Row>::COLUMN_NAMES)
        )),
    );
    for q in queries::ALL {
        rendered.insert(q.name.to_owned(), json!(queries::render(q.sql, &params)?));
        native.insert(q.name.to_owned(), json!({"sql": q.sql, "params": bound}));
    }

    // The features the code picks for this version (LowCardinality, TTL).
    let features = schema::ServerFeatures::from_version("26.9.2.1");
    assert!(features.low_cardinality && features.ttl);
    let db = schema::DEFAULT_DATABASE;
    let mut ddl = schema::ddl(db, &features, 30);
    // The migrations `schema::ensure` runs on tables of older releases: each
    // added column, dropped here to stand for a table that predates it, is
    // added back by the code's statement; then the retention is set again.
    for table in [schema::EVENTS, schema::DECISIONS] {
        for (name, ty) in schema::added_columns(table, &features) {
            ddl.push(format!("ALTER TABLE `{db}`.`{table}` DROP COLUMN {name}"));
            ddl.push(schema::add_column(db, table, name, &ty));
        }
    }
    ddl.extend(schema::TABLES.iter().map(|t| schema::modify_ttl(db, t, 30)));
    let job = json!({
        "database": db,
        "ddl": ddl,
        "rows": {
            schema::EVENTS: lines(&events)?,
            schema::DECISIONS: lines(&decisions)?,
        },
        "queries": rendered,
        "native": native,
    });
    let out = run_on_chdb(&job)?;
    // The pinned chdb-core, which the docs name.
    let root = testkit::workspace();
    let script = std::fs::read_to_string(root.join("scripts/install-deps.sh"))?;
    let pin = script
        .lines()
        .find_map(|l| l.strip_prefix("CHDB_PIN=\"chdb-core=="))
        .and_then(|v| v.strip_suffix('"'))
        .context("CHDB_PIN=\"chdb-core==…\" in scripts/install-deps.sh")?;
    assert_eq!(
        out["chdb"],
        pin,
        "{} has another chdb-core than scripts/install-deps.sh pins: run ./scripts/install-deps.sh",
        testkit::python()
    );
    let docs = std::fs::read_to_string(root.join("docs/audit.md"))?;
    assert!(
        docs.contains(&format!("`chdb-core` {pin}")),
        "docs/audit.md names chdb-core {pin}"
    );
    let version = out["version"].as_str().unwrap_or_default();
    let major = pin.split('.').next().unwrap_or_default();
    assert!(
        version.starts_with(&format!("{major}.")),
        "chdb-core {pin} runs ClickHouse {version}"
    );
    let r = &out["results"];
    for q in queries::ALL {
        assert_eq!(
            out["native"][q.name], r[q.name],
            "{}: parameters bound by ClickHouse and rendered by queries::render give the same rows",
            q.name
        );
    }

    let tree = &r[queries::DECISION_TREE.name];
    assert_eq!(col(tree, "event_id"), ["p1", "c1", "c2", "c3"], "{tree}");
    assert_eq!(col(tree, "decision"), ["allow", "allow", "deny", "allow"]);
    assert_eq!(col(tree, "parent_id"), ["", "p1", "p1", "p1"]);
    assert_eq!(
        col(tree, "parent_agent"),
        ["", "planner", "planner", "planner"]
    );
    assert_eq!(col(tree, "cache"), ["", "hit", "", ""]);
    assert_eq!(col(tree, "cache_source"), ["", "coder/c0", "", ""]);
    // The query's columns are the ones the crate's row type reads (their
    // order is checked on 18.16 by `queries.rs`: a JSON object's key order
    // here depends on serde_json's `preserve_order`, which the workspace
    // build turns on and a single-crate build does not).
    let first = tree[0].as_object().expect("a row");
    let mut names: Vec<&str> = first.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = <queries::TreeNode as clickhouse::Row>::COLUMN_NAMES.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
    assert_eq!(tree[2]["reasons"], json!(["forbid-shell-exec"]));

    // Replay reads the valid events, oldest first, and their receipts.
    let replayed = &r["replay_events"];
    assert_eq!(
        col(replayed, "event_id"),
        ["p1", "c1", "c2", "c3"],
        "{replayed}"
    );
    // What rows::rebuild_event needs comes back as stored.
    let stored = |f: fn(&rows::EventRow) -> &str| -> Vec<String> {
        events[..4].iter().map(|e| f(e).to_owned()).collect()
    };
    assert_eq!(col(replayed, "data"), stored(|e| &e.data));
    assert_eq!(col(replayed, "traceparent"), stored(|e| &e.traceparent));
    assert_eq!(
        col(replayed, "ingress_subject"),
        stored(|e| &e.ingress_subject)
    );
    let mut receipts = col(&r["replay_receipts"], "event_id");
    receipts.sort();
    assert_eq!(
        receipts,
        ["", "c1", "c2", "c3", "p1"],
        "{}",
        r["replay_receipts"]
    );

    let denials = &r[queries::DENIALS.name];
    assert_eq!(col(denials, "event_id"), ["c2"], "{denials}");
    assert_eq!(col(denials, "policy"), ["forbid-shell-exec"]);

    let tools = &r[queries::TOOLS_BY_AGENT.name];
    assert_eq!(
        col(tools, "tool"),
        ["code.search", "deploy.run", "shell.exec"],
        "{tools}"
    );
    assert_eq!(col(tools, "denied"), ["0", "0", "1"]);

    let slowest = &r[queries::SLOWEST_DECISIONS.name];
    assert_eq!(
        col(slowest, "event_id")[..4],
        ["c3", "c2", "c1", "p1"],
        "{slowest}"
    );

    let shadow = &r[queries::SHADOW_DISAGREEMENTS.name];
    assert_eq!(col(shadow, "event_id"), ["c2"], "{shadow}");
    assert_eq!(col(shadow, "shadow_decision"), ["allow"]);

    let approvals = &r[queries::APPROVALS.name];
    assert_eq!(col(approvals, "event_id"), ["c3"], "{approvals}");
    assert_eq!(col(approvals, "approver"), ["alice"]);
    assert_eq!(col(approvals, "approval_status"), ["approved"]);
    Ok(())
}

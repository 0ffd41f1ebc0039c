//! The guardrail commands as an operator runs them, against a real policy
//! worker, audit sink, NATS and ClickHouse: shadow disagreements in the
//! audit table and `meshctl policy promote`; `meshctl policy replay` from
//! ClickHouse and from JetStream; `meshctl approvals` list / approve /
//! reject with the approver in the audit; `meshctl limits` show / reset.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use std::collections::BTreeMap;
use std::process::Output;

use broker_config::RedactedOriginal;
use schemas::{Decision, EventBuilder, EventBuilderV10, subjects};
use serde_json::json;
use testkit::{Mesh, WAIT, eventually, workspace};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A copy of the shipped `policies/` (files only) with `extra` policy files.
fn policies(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = testkit::policies_copy().unwrap();
    for (name, text) in extra {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const FORBID_CODE_SEARCH: &str = "@id(\"forbid-code-search\")\nforbid (principal, action == Action::\"io.agentmesh.tool.call\", resource == Tool::\"code.search\");\n";
const PERMIT_CODER_TO_PLANNER: &str = "@id(\"coder-reports-to-planner\")\npermit (principal == Agent::\"coder\", action == Action::\"io.agentmesh.task.handoff\", resource == Agent::\"planner\");\n";

/// `testkit`'s mesh with ClickHouse (through `Deref`), the policy worker
/// and the audit sink in-process.
struct Stack {
    mesh: Mesh,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    tmp: tempfile::TempDir,
}

impl std::ops::Deref for Stack {
    type Target = Mesh;

    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl Stack {
    /// A stack whose worker runs a copy of the shipped policies (the
    /// directory, kept alive with it), with the audit sink.
    async fn with_shipped_policies() -> (tempfile::TempDir, Self) {
        let shipped = policies(&[]);
        let worker = policy_worker::Config {
            policies: shipped.path().to_owned(),
            ..Default::default()
        };
        (shipped, Self::start(worker, true).await)
    }

    async fn start(worker: policy_worker::Config, with_sink: bool) -> Self {
        Self::start_with(worker, with_sink.then_some(RedactedOriginal::Keep)).await
    }

    /// [`Stack::start`] with an audit sink told `sink` about redacted
    /// originals (`None`: no sink).
    async fn start_with(worker: policy_worker::Config, sink: Option<RedactedOriginal>) -> Self {
        let mesh = Mesh::with_clickhouse("guard").await.unwrap();
        let (nats, ch, db) = (&mesh.nats, mesh.ch(), mesh.db().to_owned());
        let tmp = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut ready = Vec::new();

        let worker_ready = tmp.path().join("worker.ready");
        let config = policy_worker::Config {
            nats: broker_config::NatsArgs::url(nats.url()),
            ready_file: Some(worker_ready.clone()),
            ..worker
        };
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            policy_worker::run(config, token).await.unwrap();
        }));
        ready.push(worker_ready);
        if let Some(redacted_original) = sink {
            let sink_ready = tmp.path().join("sink.ready");
            let mut sink = audit_sink::Config::new(nats.url(), ch.url());
            sink.redacted_original = redacted_original;
            sink.database = db.clone();
            sink.batch_period_ms = 100;
            sink.ready_file = Some(sink_ready.clone());
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                audit_sink::run(sink, token).await.unwrap();
            }));
            ready.push(sink_ready);
        }
        for r in &ready {
            eventually(WAIT, "the services' ready files", || async {
                r.exists().then_some(())
            })
            .await
            .unwrap();
        }
        Self {
            mesh,
            shutdown,
            tasks,
            tmp,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NATS_URL".into(), self.nats.url()),
            ("CLICKHOUSE_URL".into(), self.ch().url()),
            ("AGENTMESH_AUDIT_DATABASE".into(), self.db().to_owned()),
            (
                "AGENTMESH_HOME".into(),
                self.tmp.path().join("home").to_string_lossy().into_owned(),
            ),
        ]
    }

    /// `meshctl <args>` against this stack.
    async fn meshctl(&self, args: &[&str]) -> Output {
        self.meshctl_with(args, Vec::new()).await
    }

    /// `meshctl <args>` against this stack, with `overrides` of its
    /// environment.
    async fn meshctl_with(&self, args: &[&str], overrides: Vec<(String, String)>) -> Output {
        let mut env = self.env();
        env.retain(|(k, _)| overrides.iter().all(|(o, _)| o != k));
        env.extend(overrides);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
            cmd.args(&args).current_dir(workspace());
            for var in [
                "AGENTMESH_POLICIES",
                "AGENTMESH_SHADOW_POLICIES",
                "AGENTMESH_APPROVER",
            ] {
                cmd.env_remove(var);
            }
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.output().unwrap()
        })
        .await
        .unwrap()
    }

    /// Publishes `event` on `agent`'s ingress subject for `step`.
    async fn publish(&self, agent: &str, step: &str, event: &schemas::Event) {
        self.publish_event(&subjects::ingress(agent, step), event)
            .await
            .unwrap();
    }

    /// TSV of `sql` in the audit database.
    async fn query(&self, sql: &str) -> String {
        let client = self.ch().client().with_database(self.db());
        testkit::clickhouse::query_text(&client, sql).await.unwrap()
    }

    /// Waits until `decisions` has a row for each of `ids`.
    async fn wait_decisions(&self, ids: &[&str]) {
        self.wait_rows("decisions", ids).await;
    }

    /// Waits for the events and their decisions: the sink writes the two
    /// tables from separate consumers, so either may land first, and a
    /// decision tree needs both.
    async fn wait_steps(&self, ids: &[&str]) {
        self.wait_rows("events", ids).await;
        self.wait_rows("decisions", ids).await;
    }

    async fn wait_rows(&self, table: &str, ids: &[&str]) {
        let list: Vec<String> = ids.iter().map(|i| format!("'{i}'")).collect();
        let sql = format!(
            "SELECT count() FROM {table} FINAL WHERE event_id IN ({})",
            list.join(",")
        );
        eventually(WAIT, &format!("the {table} in ClickHouse"), || async {
            let n: usize = self.query(&sql).await.trim().parse().ok()?;
            (n >= ids.len()).then_some(())
        })
        .await
        .unwrap();
    }

    /// A shipped query over the last and next hour.
    async fn shipped(&self, query: audit_sink::queries::Query) -> Vec<String> {
        let now = chrono::Utc::now();
        let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
        let params = BTreeMap::from([
            ("from".to_owned(), fmt(now - chrono::Duration::hours(1))),
            ("to".to_owned(), fmt(now + chrono::Duration::hours(1))),
        ]);
        let sql = audit_sink::queries::render(query.sql, &params).unwrap();
        self.query(&sql).await.lines().map(str::to_owned).collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "meshctl failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

const TRACE: &str = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn tool_call(id: &str, agent: &str, tool: &str) -> schemas::Event {
    EventBuilderV10::new()
        .id(id)
        .source(format!("/agents/{agent}"))
        .ty("io.agentmesh.tool.call")
        .subject(tool)
        .extension("traceparent", TRACE)
        .data("application/json", json!({"args": format!("for {id}")}))
        .build()
        .unwrap()
}

fn handoff(id: &str, from: &str, to: &str) -> schemas::Event {
    EventBuilderV10::new()
        .id(id)
        .source(format!("/agents/{from}"))
        .ty("io.agentmesh.task.handoff")
        .extension("target", to)
        .extension("traceparent", TRACE)
        .data("application/json", json!({"task": "next step"}))
        .build()
        .unwrap()
}

#[tokio::test]
async fn shadow_disagreements_reach_clickhouse_and_promote_enforces_the_shadow_set() {
    let active = policies(&[]);
    let shadow = policies(&[("next.cedar", FORBID_CODE_SEARCH)]);
    let stack = Stack::start(
        policy_worker::Config {
            policies: active.path().to_owned(),
            shadow_policies: Some(shadow.path().to_owned()),
            ..Default::default()
        },
        true,
    )
    .await;
    stack
        .publish(
            "coder",
            "tool_call",
            &tool_call("s1", "coder", "code.search"),
        )
        .await;
    stack
        .publish("planner", "handoff", &handoff("s2", "planner", "coder"))
        .await;
    stack.wait_decisions(&["s1", "s2"]).await;
    let rows = stack
        .shipped(audit_sink::queries::SHADOW_DISAGREEMENTS)
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let f: Vec<&str> = rows[0].split('\t').collect();
    assert_eq!(
        (f[11], f[5], f[7], f[8]),
        ("s1", "allow", "deny", "['forbid-code-search']")
    );

    let check = ok(&stack
        .meshctl(&["policy", "check", &shadow.path().to_string_lossy()])
        .await);
    let shadow_hash = policy_engine::PolicyBundle::load(shadow.path())
        .unwrap()
        .hash()
        .to_owned();
    assert!(check.contains(&shadow_hash), "{check}");
    assert!(
        check.contains("require approval: deploys-need-approval"),
        "{check}"
    );
    let backup = stack.tmp.path().join("backup");
    let promoted = ok(&stack
        .meshctl(&[
            "policy",
            "promote",
            "--shadow",
            &shadow.path().to_string_lossy(),
            "--policies",
            &active.path().to_string_lossy(),
            "--backup",
            &backup.to_string_lossy(),
        ])
        .await);
    assert!(
        promoted.contains(&format!("policy hash {shadow_hash}")),
        "{promoted}"
    );
    assert!(backup.join("mesh.cedar").is_file());
    assert!(active.path().join("next.cedar").is_file());
    // The running worker reloads: a new code.search call is now denied.
    let mut n = 0;
    let receipt = eventually(WAIT, "a receipt under the promoted set", || {
        n += 1;
        let id = format!("after-{n}");
        let stack = &stack;
        let shadow_hash = &shadow_hash;
        async move {
            stack
                .publish(
                    "coder",
                    "tool_call",
                    &tool_call(&id, "coder", "code.search"),
                )
                .await;
            let r = stack.receipt(&id).await.unwrap();
            (&r.policy_hash == shadow_hash).then_some(r)
        }
    })
    .await
    .unwrap();
    assert_eq!(receipt.decision, Decision::Deny);
    assert_eq!(receipt.reasons, vec!["forbid-code-search"]);
    assert_eq!(receipt.shadow_decision, Some(Decision::Deny));
    // Promoting again finds nothing to do.
    let again = ok(&stack
        .meshctl(&[
            "policy",
            "promote",
            "--shadow",
            &shadow.path().to_string_lossy(),
            "--policies",
            &active.path().to_string_lossy(),
        ])
        .await);
    assert!(again.contains("nothing to promote"), "{again}");
    stack.stop().await;
}

#[test]
fn promote_carries_the_cache_and_flow_rules_and_the_properties_with_the_policies() {
    let examples = workspace().join("examples/policies");
    let read = |name: &str| std::fs::read_to_string(examples.join(name)).unwrap();
    let active = policies(&[("cache.toml", &read("cache.toml"))]);
    let shadow = policies(&[
        ("flows.toml", &read("flows.toml")),
        ("exfiltration.cedar", &read("exfiltration.cedar")),
        ("properties.toml", "# no claims in this set\n"),
    ]);
    let shadow_hash = policy_engine::PolicyBundle::load(shadow.path())
        .unwrap()
        .hash()
        .to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["policy", "promote", "--shadow"])
        .arg(shadow.path())
        .arg("--policies")
        .arg(active.path())
        .env_remove("AGENTMESH_POLICIES")
        .env_remove("AGENTMESH_SHADOW_POLICIES")
        .output()
        .unwrap();
    let promoted = ok(&out);
    assert!(
        promoted.contains(&format!("policy hash {shadow_hash}")),
        "{promoted}"
    );
    let now = |name: &str| std::fs::read_to_string(active.path().join(name)).ok();
    assert_eq!(now("flows.toml"), Some(read("flows.toml")));
    assert_eq!(
        now("properties.toml").as_deref(),
        Some("# no claims in this set\n")
    );
    assert_eq!(now("cache.toml"), None, "the shadow set has no cache rules");
    assert_eq!(
        policy_engine::PolicyBundle::load(active.path())
            .unwrap()
            .hash(),
        shadow_hash
    );
}

#[tokio::test]
async fn replay_reports_what_a_candidate_set_would_change() {
    let (shipped, stack) = Stack::with_shipped_policies().await;
    stack
        .publish(
            "coder",
            "tool_call",
            &tool_call("e1", "coder", "code.search"),
        )
        .await;
    stack
        .publish("coder", "handoff", &handoff("e2", "coder", "planner"))
        .await;
    stack
        .publish("planner", "handoff", &handoff("e3", "planner", "coder"))
        .await;
    stack
        .publish(
            "coder",
            "tool_call",
            &tool_call("e4", "coder", "shell.exec"),
        )
        .await;
    // Parked for approval: no receipt yet.
    stack
        .publish(
            "coder",
            "tool_call",
            &tool_call("e5", "coder", "deploy.prod"),
        )
        .await;
    stack.wait_decisions(&["e1", "e2", "e3", "e4"]).await;
    eventually(WAIT, "five events in ClickHouse", || async {
        let n: u64 = stack
            .query("SELECT count() FROM events FINAL")
            .await
            .trim()
            .parse()
            .ok()?;
        (n >= 5).then_some(())
    })
    .await
    .unwrap();

    let candidate = policies(&[
        ("next.cedar", FORBID_CODE_SEARCH),
        ("more.cedar", PERMIT_CODER_TO_PLANNER),
    ]);
    let cand = candidate.path().to_string_lossy().into_owned();
    for from in ["clickhouse", "jetstream"] {
        let out = ok(&stack
            .meshctl(&[
                "policy",
                "replay",
                "--policies",
                &cand,
                "--since",
                "1h",
                "--from",
                from,
                "--json",
            ])
            .await);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["events"], 5, "{from}: {out}");
        assert_eq!(report["without_recorded_decision"], 1, "{from}");
        assert_eq!(report["changed"], 2, "{from}");
        assert_eq!(report["unchanged"], 2, "{from}");
        let mut changes: Vec<(String, String, String)> = report["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["event_id"].as_str().unwrap().to_owned(),
                    format!("{} -> {}", e["recorded"], e["candidate"]),
                    e["candidate_reasons"].to_string(),
                )
            })
            .collect();
        changes.sort();
        assert_eq!(
            changes,
            vec![
                (
                    "e1".to_owned(),
                    "\"allow\" -> \"deny\"".to_owned(),
                    "[\"forbid-code-search\"]".to_owned()
                ),
                (
                    "e2".to_owned(),
                    "\"deny\" -> \"allow\"".to_owned(),
                    "[\"coder-reports-to-planner\"]".to_owned()
                ),
            ],
            "{from}"
        );
    }

    let out = ok(&stack
        .meshctl(&["policy", "replay", "--policies", &cand, "--since", "1h"])
        .await);
    assert!(out.contains("Replayed 5 events from ClickHouse"), "{out}");
    assert!(out.contains("allow → deny"), "{out}");
    assert!(out.contains("deny → allow"), "{out}");
    assert!(out.contains("candidate: forbid-code-search"), "{out}");
    assert!(
        out.contains("recorded:  members-call-low-risk-tools"),
        "{out}"
    );

    let gate = stack
        .meshctl(&[
            "policy",
            "replay",
            "--policies",
            &cand,
            "--since",
            "1h",
            "--fail-on-change",
        ])
        .await;
    assert_eq!(gate.status.code(), Some(1));

    let same = ok(&stack
        .meshctl(&[
            "policy",
            "replay",
            "--policies",
            &shipped.path().to_string_lossy(),
            "--since",
            "1h",
            "--fail-on-change",
        ])
        .await);
    assert!(same.contains("No decision would change."), "{same}");
    stack.stop().await;
}

/// A `code.search` call from the coder to itself with these arguments.
fn search_call(id: &str, arguments: serde_json::Value) -> schemas::Event {
    EventBuilderV10::new()
        .id(id)
        .source("/agents/coder")
        .ty("io.agentmesh.tool.call")
        .subject("code.search")
        .extension("target", "coder")
        .extension("traceparent", TRACE)
        .data(
            "application/json",
            json!({"tool": "code.search", "arguments": arguments}),
        )
        .build()
        .unwrap()
}

/// `meshctl policy replay -o json` of the last hour against `dir`.
async fn replay_json(stack: &Stack, dir: &str, from: &str, more: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "policy",
        "replay",
        "--policies",
        dir,
        "--since",
        "1h",
        "--from",
        from,
        "-o",
        "json",
    ];
    args.extend_from_slice(more);
    let out = ok(&stack.meshctl(&args).await);
    serde_json::from_str(&out).unwrap()
}

/// The transitions of a replay report as `recorded -> candidate: events`.
fn transitions(report: &serde_json::Value) -> Vec<String> {
    report["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{} -> {}: {}",
                t["recorded"].as_str().unwrap(),
                t["candidate"].as_str().unwrap(),
                t["events"]
            )
        })
        .collect()
}

/// Replay checks a tool call's arguments against the input schema in its
/// target's card, as the worker does: the call the worker found invalid
/// for its arguments replays `invalid` (not `allow`), from ClickHouse and
/// from JetStream; with `--cards none` it would be allowed, and the report
/// says no arguments were checked; a card changed since the decision
/// changes the outcome, with the worker's reason and violations.
#[tokio::test]
async fn replay_checks_tool_call_arguments_as_the_worker_does() {
    let (shipped, stack) = Stack::with_shipped_policies().await;
    let card = |required: serde_json::Value| {
        json!({"name": "coder", "tools": [{"name": "code.search", "inputSchema": {
            "type": "object",
            "properties": {"query": {"type": "string", "minLength": 1}, "limit": {"type": "integer"}},
            "required": required
        }}]})
    };
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let agents = js.get_key_value(subjects::BUCKET_AGENTS).await.unwrap();
    agents
        .put(
            "coder",
            serde_json::to_vec(&card(json!(["query"]))).unwrap().into(),
        )
        .await
        .unwrap();
    for (id, query) in [("bad", ""), ("good", "q")] {
        stack
            .publish(
                "coder",
                "tool_call",
                &search_call(id, json!({"query": query})),
            )
            .await;
    }
    stack.wait_steps(&["bad", "good"]).await;
    let recorded = stack
        .query("SELECT event_id, decision FROM decisions FINAL ORDER BY event_id")
        .await;
    assert_eq!(recorded, "bad\tinvalid\ngood\tallow\n");

    let shipped_dir = shipped.path().to_string_lossy().into_owned();
    let replay = |more: &'static [&'static str], from: &'static str| {
        replay_json(&stack, &shipped_dir, from, more)
    };
    for from in ["clickhouse", "jetstream"] {
        let report = replay(&[], from).await;
        assert_eq!(report["changed"], 0, "{from}: {report}");
        assert_eq!(
            transitions(&report),
            ["allow -> allow: 1", "invalid -> invalid: 1"],
            "{from}: {report}"
        );
        assert_eq!(
            report["cards"],
            json!({"bucket": "mesh-agents", "agents": 1, "tools_with_input_schema": 1, "unreadable": 0}),
            "{from}"
        );

        let unchecked = replay(&["--cards", "none"], from).await;
        assert_eq!(unchecked["cards"], serde_json::Value::Null, "{from}");
        assert_eq!(
            transitions(&unchecked),
            ["allow -> allow: 1", "invalid -> allow: 1"],
            "{from}: {unchecked}"
        );
    }
    let text = ok(&stack
        .meshctl(&[
            "policy",
            "replay",
            "--policies",
            &shipped_dir,
            "--since",
            "1h",
        ])
        .await);
    assert!(
        text.contains("Tool calls checked against the input schemas of 1 agent cards in `mesh-agents` as they are now (1 tools)."),
        "{text}"
    );
    assert!(text.contains("No decision would change."), "{text}");

    // The card now also requires `limit`: the good call would break it.
    agents
        .put(
            "coder",
            serde_json::to_vec(&card(json!(["query", "limit"])))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    let report = replay(&[], "clickhouse").await;
    assert_eq!(
        transitions(&report),
        ["allow -> invalid: 1", "invalid -> invalid: 1"],
        "{report}"
    );
    let example = &report["examples"][0];
    assert_eq!(example["event_id"], "good", "{report}");
    assert_eq!(example["candidate_reasons"], json!(["input-schema"]));
    let errors = example["candidate_errors"].to_string();
    assert!(
        errors.contains("arguments of `code.search` at `/`") && errors.contains("limit"),
        "{errors}"
    );

    // No NATS to read the cards from: a replay from ClickHouse still runs
    // without them, saying so, unless `--cards current` asks for them.
    let no_nats = || {
        let port = testkit::free_port().unwrap();
        vec![("NATS_URL".to_owned(), format!("nats://127.0.0.1:{port}"))]
    };
    let args = [
        "policy",
        "replay",
        "--policies",
        &shipped_dir,
        "--since",
        "1h",
        "--from",
        "clickhouse",
        "-o",
        "json",
    ];
    let out = stack.meshctl_with(&args, no_nats()).await;
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["cards"], serde_json::Value::Null, "{report}");
    assert_eq!(
        transitions(&report),
        ["allow -> allow: 1", "invalid -> allow: 1"],
        "{report}"
    );
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("mesh-agents") && warning.contains("--cards current"),
        "{warning}"
    );
    let strict = [&args[..], &["--cards", "current"]].concat();
    let out = stack.meshctl_with(&strict, no_nats()).await;
    let error = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{error}");
    assert!(error.contains("--cards none"), "{error}");
    stack.stop().await;
}

#[tokio::test]
async fn approvals_are_listed_approved_and_rejected_with_the_approver_audited() {
    let (_shipped, stack) = Stack::with_shipped_policies().await;
    stack
        .publish(
            "coder",
            "tool_call",
            &tool_call("p1", "coder", "deploy.prod"),
        )
        .await;
    stack
        .publish(
            "coder",
            "tool_call",
            &tool_call("p2", "coder", "deploy.prod"),
        )
        .await;
    let listed = eventually(WAIT, "two pending approvals", || async {
        let out = stack.meshctl(&["approvals", "list"]).await;
        let text = text(&out.stdout);
        (text.lines().filter(|l| l.contains(" pending ")).count() == 2).then_some(text)
    })
    .await
    .unwrap();
    assert!(listed.contains("coder tool.call deploy.prod"), "{listed}");
    assert!(listed.contains("deploys-need-approval"), "{listed}");

    let p1 = schemas::approval::approval_id("coder", "p1");
    let p2 = schemas::approval::approval_id("coder", "p2");
    let shown = ok(&stack.meshctl(&["approvals", "show", &p1[..8]]).await);
    assert!(shown.contains("for p1"), "{shown}");
    // `-o json`: the documented shapes, with the parked event's data.
    let listed: serde_json::Value = serde_json::from_str(&ok(&stack
        .meshctl(&["approvals", "list", "-o", "json"])
        .await))
    .unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    crate::support::json_shapes::check("approvals list", &listed);
    let shown: serde_json::Value = serde_json::from_str(&ok(&stack
        .meshctl(&["approvals", "show", &p1[..8], "-o", "json"])
        .await))
    .unwrap();
    let mut shape = crate::support::json_shapes::documented("approvals list");
    shape.array = false;
    shape.fields.insert("data".to_owned());
    crate::support::json_shapes::check_against("approvals show", &shape, &shown);
    assert_eq!(shown["id"], p1.as_str(), "{shown}");
    assert_eq!(shown["status"], "pending", "{shown}");
    assert_eq!(shown["agent"], "coder", "{shown}");
    assert_eq!(shown["receipt"]["event_id"], "p1", "{shown}");
    assert!(
        shown["receipt"]["reasons"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("deploys-need-approval"))),
        "{shown}"
    );
    assert_eq!(shown["data"], json!({"args": "for p1"}), "{shown}");

    let approved = ok(&stack
        .meshctl(&[
            "approvals",
            "approve",
            &p1[..8],
            "--approver",
            "alice",
            "--comment",
            "ship it",
        ])
        .await);
    assert!(approved.starts_with("approved"), "{approved}");
    let rejected = ok(&stack
        .meshctl(&[
            "approvals",
            "reject",
            &p2,
            "--approver",
            "bob",
            "--comment",
            "not on a friday",
        ])
        .await);
    assert!(rejected.starts_with("rejected"), "{rejected}");
    let again = stack
        .meshctl(&["approvals", "approve", &p2, "--approver", "alice"])
        .await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("already rejected"),
        "{}",
        text(&again.stderr)
    );

    assert_eq!(
        ok(&stack.meshctl(&["approvals", "list"]).await),
        "No approval requests.\n"
    );
    let all = ok(&stack.meshctl(&["approvals", "list", "--all"]).await);
    assert!(all.contains("approved by alice"), "{all}");
    assert!(all.contains("rejected by bob"), "{all}");

    let r1 = stack.receipt("p1").await.unwrap();
    assert_eq!(r1.decision, Decision::Allow);
    assert_eq!(r1.approval.as_ref().unwrap().approver, "alice");
    stack.wait_decisions(&["p1", "p2"]).await;
    let rows = stack.shipped(audit_sink::queries::APPROVALS).await;
    let cols: Vec<String> = rows
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            format!("{} {} {} {} {}", f[11], f[5], f[6], f[7], f[8])
        })
        .collect();
    assert_eq!(
        cols,
        vec![
            "p1 approved alice ship it allow",
            "p2 rejected bob not on a friday deny"
        ]
    );
    stack.stop().await;
}

#[tokio::test]
async fn limits_are_shown_and_reset() {
    let limited = policies(&[(
        "limits.cedar",
        "@id(\"two-an-hour\")\nforbid (principal == Agent::\"reviewer\", action, resource) when { context.rate.per_hour > 2 };\n",
    )]);
    let stack = Stack::start(
        policy_worker::Config {
            policies: limited.path().to_owned(),
            ..Default::default()
        },
        false,
    )
    .await;
    // One minute (and hour) for the whole test, so the windows do not roll.
    while {
        use chrono::Timelike;
        let now = chrono::Utc::now();
        now.second() > 45 || (now.minute() == 59 && now.second() > 30)
    } {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let step = |id: &str| {
        EventBuilderV10::new()
            .id(id)
            .source("/agents/reviewer")
            .ty("io.agentmesh.reasoning")
            .extension("traceparent", TRACE)
            .data("application/json", json!({"usage": {"total_tokens": 250}}))
            .build()
            .unwrap()
    };
    for (id, decision) in [
        ("l1", Decision::Allow),
        ("l2", Decision::Allow),
        ("l3", Decision::Deny),
    ] {
        stack.publish("reviewer", "reasoning", &step(id)).await;
        assert_eq!(stack.receipt(id).await.unwrap().decision, decision, "{id}");
    }
    let shown = ok(&stack
        .meshctl(&[
            "limits",
            "show",
            "--workflow",
            "5bf92f3577b34da6a3ce929d0e0e4736",
        ])
        .await);
    let line = shown
        .lines()
        .find(|l| l.starts_with("reviewer"))
        .unwrap_or_else(|| panic!("{shown}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cols[1..5], ["3", "3", "3", "750"], "{shown}");
    assert!(
        shown.contains("3 events, 0 tool calls, 750 tokens"),
        "{shown}"
    );

    let reset = ok(&stack.meshctl(&["limits", "reset", "reviewer"]).await);
    assert!(reset.contains("agent.reviewer"), "{reset}");
    stack.publish("reviewer", "reasoning", &step("l4")).await;
    assert_eq!(stack.receipt("l4").await.unwrap().decision, Decision::Allow);
    let shown = ok(&stack.meshctl(&["limits", "show", "reviewer"]).await);
    assert!(
        shown
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()[..4] == ["reviewer", "1", "1", "1"]),
        "{shown}"
    );
    stack.stop().await;
}

/// A `tool` call from the planner to the coder with `args`, and the coder's
/// successful answer to it.
fn cached_call(id: &str, tool: &str, args: serde_json::Value) -> schemas::Event {
    EventBuilderV10::new()
        .id(id)
        .source("/agents/planner")
        .ty("io.agentmesh.tool.call")
        .subject(tool)
        .extension("target", "coder")
        .extension("traceparent", TRACE)
        .data("application/json", json!({"tool": tool, "arguments": args}))
        .build()
        .unwrap()
}

fn tool_answer(id: &str, call: &str, tool: &str) -> schemas::Event {
    EventBuilderV10::new()
        .id(id)
        .source("/agents/coder")
        .ty("io.agentmesh.tool.result")
        .subject(tool)
        .extension("target", "planner")
        .extension("causationid", call)
        .extension("causationsource", "/agents/planner")
        .extension("traceparent", TRACE)
        .data(
            "application/json",
            json!({"tool": tool, "ok": true, "result": format!("answer to {call}")}),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_tool_cache_is_shown_purged_per_tool_and_whole_and_follows_cache_toml() {
    let dir = policies(&[(
        "cache.toml",
        "[tools.\"code.search\"]\nttl_secs = 600\nscope = \"shared\"\n\n[tools.\"tests.run\"]\nttl_secs = 600\n",
    )]);
    let stack = Stack::start(
        policy_worker::Config {
            policies: dir.path().to_owned(),
            ..Default::default()
        },
        true,
    )
    .await;
    let cache = |id: &str| {
        let id = id.to_owned();
        let stack = &stack;
        async move { stack.receipt(&id).await.unwrap().cache }
    };
    let search = json!({"query": "fn signup"});
    let suite = json!({"suite": "unit"});
    for (call, answer, tool, args) in [
        ("s1", "sr1", "code.search", &search),
        ("t1", "tr1", "tests.run", &suite),
    ] {
        stack
            .publish(
                "planner",
                "tool_call",
                &cached_call(call, tool, args.clone()),
            )
            .await;
        assert_eq!(cache(call).await, Some(schemas::CacheStatus::Miss));
        stack
            .publish("coder", "tool_result", &tool_answer(answer, call, tool))
            .await;
        assert_eq!(cache(answer).await, Some(schemas::CacheStatus::Stored));
    }
    let status = ok(&stack.meshctl(&["cache", "status"]).await);
    assert!(status.starts_with("mesh-tool-cache: 2 entries"), "{status}");

    let purged = ok(&stack
        .meshctl(&["cache", "purge", "--tool", "tests.run"])
        .await);
    assert!(
        purged.contains("Purged 1 cached results of `tests.run`"),
        "{purged}"
    );
    let hit = Some(schemas::CacheStatus::Hit);
    let miss = Some(schemas::CacheStatus::Miss);
    for (call, tool, args, want) in [
        ("t2", "tests.run", &suite, miss),
        ("s2", "code.search", &search, hit),
    ] {
        stack
            .publish(
                "planner",
                "tool_call",
                &cached_call(call, tool, args.clone()),
            )
            .await;
        assert_eq!(cache(call).await, want, "{call}");
    }

    // The audit records what the cache did, and the tree draws the cached
    // answer under its call with the call that produced it.
    stack.wait_steps(&["s1", "sr1", "s2", "t2"]).await;
    let rows = stack
        .query("SELECT event_id, cache, cache_source FROM decisions FINAL WHERE event_id IN ('s1', 'sr1', 's2', 't2') ORDER BY event_id")
        .await;
    assert_eq!(
        rows,
        "s1\tmiss\t\ns2\thit\tplanner/s1\nsr1\tstored\tplanner/s1\nt2\tmiss\t\n"
    );
    let tree = ok(&stack
        .meshctl(&["trace", "5bf92f3577b34da6a3ce929d0e0e4736"])
        .await);
    assert!(tree.contains(", 1 answered from the cache"), "{tree}");
    let hit = tree
        .lines()
        .position(|l| l.contains("answered from the cache") && l.contains("tool.call code.search"))
        .unwrap_or_else(|| panic!("{tree}"));
    let answer = tree.lines().nth(hit + 1).unwrap_or_default();
    assert!(
        answer.contains("coder     tool.result → planner")
            && answer.ends_with("from the cache, first produced by call planner/s1"),
        "{tree}"
    );
    assert!(
        tree.lines()
            .any(|l| l.contains("tool.result → planner") && l.ends_with("· stored in the cache")),
        "{tree}"
    );

    let purged = ok(&stack.meshctl(&["cache", "purge"]).await);
    assert!(purged.contains("Purged the tool cache"), "{purged}");
    stack
        .publish(
            "planner",
            "tool_call",
            &cached_call("s3", "code.search", search.clone()),
        )
        .await;
    assert_eq!(cache("s3").await, miss);

    // Declarations are reloaded with the policies: code.search is no
    // longer cacheable once cache.toml drops it.
    std::fs::write(
        dir.path().join("cache.toml"),
        "[tools.\"tests.run\"]\nttl_secs = 600\n",
    )
    .unwrap();
    let mut n = 0;
    eventually(WAIT, "cache.toml to be reloaded", || {
        n += 1;
        let id = format!("s-reload-{n}");
        let stack = &stack;
        let search = search.clone();
        async move {
            stack
                .publish(
                    "planner",
                    "tool_call",
                    &cached_call(&id, "code.search", search),
                )
                .await;
            stack
                .receipt(&id)
                .await
                .unwrap()
                .cache
                .is_none()
                .then_some(())
        }
    })
    .await
    .unwrap();
    stack.stop().await;
}

/// The messages of the `@redact` example (coder to reviewer): an address in
/// JSON, a phone number and an address in plain text, and a clean one.
const REDACTED_MESSAGES: [(&str, &str, &str); 3] = [
    (
        "r-json",
        "application/json",
        r#"{"text":"mail bob@example.com","n":1}"#,
    ),
    (
        "r-text",
        "text/plain",
        "call +44 20 7946 0958 or write to carol@example.org",
    ),
    ("r-clean", "text/plain", "looks good to me"),
];

/// The stack (worker and sink both told `mode`) on the shipped policies plus
/// `examples/policies/redact.cedar`, once the three [`REDACTED_MESSAGES`]
/// are decided and their rows are in `events`; returns the rows' `id`,
/// `data`, `data_encoding` (and the policy directory, kept while it runs).
async fn redacted_messages(
    mode: RedactedOriginal,
) -> (Stack, Vec<(String, String, String)>, tempfile::TempDir) {
    let redact =
        std::fs::read_to_string(workspace().join("examples/policies/redact.cedar")).unwrap();
    let dir = policies(&[("redact.cedar", &redact)]);
    let stack = Stack::start_with(
        policy_worker::Config {
            policies: dir.path().to_owned(),
            redacted_original: mode,
            ..Default::default()
        },
        Some(mode),
    )
    .await;
    for (id, content_type, data) in REDACTED_MESSAGES {
        let event = EventBuilderV10::new()
            .id(id)
            .source("/agents/coder")
            .ty("io.agentmesh.message")
            .extension("target", "reviewer")
            .extension("traceparent", TRACE)
            .data(content_type, data.to_owned())
            .build()
            .unwrap();
        stack.publish("coder", "message", &event).await;
    }
    stack.wait_decisions(&["r-json", "r-text", "r-clean"]).await;
    for (id, kinds) in [
        ("r-json", vec!["pii.email"]),
        ("r-text", vec!["pii.email", "pii.phone"]),
        ("r-clean", vec![]),
    ] {
        let receipt = stack.receipt(id).await.unwrap();
        assert_eq!(receipt.decision, Decision::Allow, "{receipt:?}");
        assert_eq!(receipt.redacted, kinds, "{id}");
    }
    let rows = eventually(WAIT, "the three rows in `events`", || async {
        let tsv = stack
            .query("SELECT event_id, data, data_encoding FROM events FINAL ORDER BY event_id")
            .await;
        let rows: Vec<(String, String, String)> = tsv
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t').map(str::to_owned);
                Some((f.next()?, f.next()?, f.next()?))
            })
            .collect();
        (rows.len() == 3).then_some(rows)
    })
    .await
    .unwrap();
    (stack, rows, dir)
}

/// Whether any of the originals' personal data is in `text`.
fn holds_an_original(text: &str) -> bool {
    ["bob@example.com", "carol@example.org", "7946 0958"]
        .iter()
        .any(|p| text.contains(p))
}

#[tokio::test]
async fn a_kept_original_is_in_the_audit_row_and_the_ingress_stream() {
    let (stack, rows, _dir) = redacted_messages(RedactedOriginal::Keep).await;
    let row = |id: &str| rows.iter().find(|r| r.0 == id).unwrap().clone();
    assert_eq!(
        row("r-json"),
        (
            "r-json".to_owned(),
            REDACTED_MESSAGES[0].2.to_owned(),
            "utf8".to_owned()
        )
    );
    assert!(holds_an_original(&row("r-text").1), "{rows:?}");
    let ingress = stack.messages(subjects::STREAM_INGRESS).await.unwrap();
    assert_eq!(ingress.len(), 3);
    stack.stop().await;
}

#[tokio::test]
async fn a_dropped_original_reaches_neither_the_audit_nor_any_stream() {
    let (stack, rows, dir) = redacted_messages(RedactedOriginal::Drop).await;
    // The rows of the redacted events have no data; the clean one is whole.
    assert_eq!(
        rows,
        vec![
            (
                "r-clean".to_owned(),
                "looks good to me".to_owned(),
                "utf8".to_owned()
            ),
            ("r-json".to_owned(), String::new(), "dropped".to_owned()),
            ("r-text".to_owned(), String::new(), "dropped".to_owned()),
        ]
    );
    // Nothing else in ClickHouse holds them: no quarantined row, no receipt.
    for sql in [
        "SELECT count() FROM rejected",
        "SELECT count() FROM events WHERE data LIKE '%example.%' OR data LIKE '%7946%'",
    ] {
        assert_eq!(stack.query(sql).await.trim(), "0", "{sql}");
    }
    assert!(!holds_an_original(
        &stack.query("SELECT * FROM decisions").await
    ));
    // Erased from MESH_INGRESS; every stream the worker wrote holds the
    // redacted copies only.
    let ingress = stack.messages(subjects::STREAM_INGRESS).await.unwrap();
    assert_eq!(ingress.len(), 1, "only the clean message stays");
    for stream in [
        subjects::STREAM_INGRESS,
        subjects::STREAM_DELIVER,
        subjects::STREAM_DEAD,
        subjects::STREAM_DECISION,
    ] {
        for m in stack.messages(stream).await.unwrap() {
            assert!(
                !holds_an_original(&String::from_utf8_lossy(&m.payload)),
                "{stream}"
            );
        }
    }
    assert_eq!(
        stack
            .messages(subjects::STREAM_DELIVER)
            .await
            .unwrap()
            .len(),
        3
    );
    // Replay cannot decide a dropped event again, and says why.
    let dir = dir.path().to_string_lossy().into_owned();
    let out = ok(&stack
        .meshctl(&[
            "policy",
            "replay",
            "--policies",
            &dir,
            "--since",
            "1h",
            "--from",
            "clickhouse",
            "--json",
        ])
        .await);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["events"], 3, "{out}");
    assert!(
        out.contains("its original dropped (--redacted-original drop)"),
        "{out}"
    );
    stack.stop().await;
}

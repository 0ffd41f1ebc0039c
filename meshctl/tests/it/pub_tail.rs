//! `meshctl pub` and `meshctl tail` as a user runs them, against a real
//! policy worker, audit sink, NATS and ClickHouse: an allowed, a denied and
//! an invalid event with their receipts (text and `-o json`), `tail` of
//! receipts, deliveries and dead letters with their filters, live and from
//! `--since`; and the one line and exit code of each kind of bad input.

use crate::support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Output, Stdio};

use support::services::{Services, workspace};
use testkit::free_port;

/// `meshctl <args>` with only `env` pointing it at servers.
fn command(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args).current_dir(workspace());
    for var in [
        "NATS_URL",
        "CLICKHOUSE_URL",
        "AGENTMESH_AUDIT_DATABASE",
        "AGENTMESH_HOME",
        "NATS_NKEY_SEED_FILE",
        "NATS_CREDS",
        "CLICKHOUSE_USER",
        "CLICKHOUSE_PASSWORD",
        "AGENTMESH_POLICIES",
        "AGENTMESH_NKEY_FILE",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

async fn meshctl(env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = command(env, args);
    Ok(tokio::task::spawn_blocking(move || cmd.output()).await??)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(out: &Output) -> anyhow::Result<serde_json::Value> {
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "not JSON ({e}):\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// The JSON lines `tail` printed.
fn json_lines(out: &Output) -> anyhow::Result<Vec<serde_json::Value>> {
    text(&out.stdout)
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// A `tail` running in the background, once it follows its stream.
struct Following {
    child: Option<Child>,
}

impl Following {
    async fn start(env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<Self> {
        let mut child = command(env, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        // Its first line on stderr says it follows: what is published
        // from now on, it sees.
        let first = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stderr).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(testkit::WAIT, first).await???;
        anyhow::ensure!(line.starts_with("following "), "tail said: {line}");
        Ok(Self { child: Some(child) })
    }

    /// Waits for it to exit (it was given `--count`) and returns its stdout.
    async fn output(mut self) -> anyhow::Result<Output> {
        let child = self
            .child
            .take()
            .ok_or_else(|| anyhow::anyhow!("waited for twice"))?;
        let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
        Ok(tokio::time::timeout(testkit::WAIT, waited).await???)
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn pub_prints_receipts_and_tail_follows_them_with_filters() -> anyhow::Result<()> {
    let services = Services::start("pubtail").await?;
    let (nats_url, ch_url) = (services.nats.url(), services.ch().url());
    let home = services.tmp.path().join("home");
    let home = home.to_string_lossy();
    let env = [
        ("NATS_URL", nats_url.as_str()),
        ("CLICKHOUSE_URL", ch_url.as_str()),
        ("AGENTMESH_AUDIT_DATABASE", services.db()),
        ("AGENTMESH_HOME", &home),
    ];

    // Live: a tail of coder's deliveries, started before the handoff.
    let deliveries = Following::start(
        &env,
        &[
            "tail",
            "deliveries",
            "--agent",
            "coder",
            "--count",
            "1",
            "-o",
            "json",
        ],
    )
    .await?;
    let receipts = Following::start(
        &env,
        &[
            "tail",
            "receipts",
            "--agent",
            "planner",
            "--decision",
            "invalid",
            "--count",
            "1",
        ],
    )
    .await?;

    let handoff = meshctl(
        &env,
        &[
            "pub",
            "--agent",
            "planner",
            "--type",
            "task.handoff",
            "--target",
            "coder",
            "--data",
            r#"{"text":"write the test"}"#,
            "-o",
            "json",
        ],
    )
    .await?;
    assert_eq!(handoff.status.code(), Some(0), "{}", text(&handoff.stderr));
    let receipt = json(&handoff)?;
    support::json_shapes::check("pub", &receipt);
    assert_eq!(receipt["decision"], "allow", "{receipt}");
    assert_eq!(receipt["agent"], "planner");
    assert_eq!(receipt["type"], "io.agentmesh.task.handoff");
    assert_eq!(receipt["target"], "coder");
    assert_eq!(
        receipt["ingress_subject"],
        "mesh.ingress.planner.task_handoff"
    );
    let handoff_id = receipt["event_id"].as_str().unwrap_or_default().to_owned();
    let trace = receipt["trace_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(trace.len(), 32, "{receipt}");

    let seen = json_lines(&deliveries.output().await?)?;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["feed"], "deliveries");
    assert_eq!(seen[0]["subject"], "mesh.deliver.coder.planner");
    assert_eq!(seen[0]["event_id"], handoff_id.as_str());
    assert_eq!(seen[0]["decision"], "allow");
    assert_eq!(seen[0]["trace_id"], trace.as_str());
    assert_eq!(
        seen[0]["data"],
        serde_json::json!({"text": "write the test"})
    );

    // The same step in text, in the same trace: the receipt as lines.
    let text_pub = meshctl(
        &env,
        &[
            "pub",
            "--agent",
            "planner",
            "--type",
            "reasoning",
            "--trace",
            &trace,
            "--data",
            r#"{"text":"thinking"}"#,
        ],
    )
    .await?;
    let out = text(&text_pub.stdout);
    assert_eq!(
        text_pub.status.code(),
        Some(0),
        "{out}{}",
        text(&text_pub.stderr)
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("published io.agentmesh.reasoning `")
                && l.ends_with(&format!(
                    "as planner on mesh.ingress.planner.reasoning (trace {trace})"
                ))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l == "decision  allow   by members-record-steps"),
        "{out}"
    );

    // Denied: exit 1, the policies that denied it.
    let denied = meshctl(
        &env,
        &[
            "pub",
            "--agent",
            "coder",
            "--type",
            "tool.call",
            "--subject",
            "shell.exec",
            "--data",
            r#"{"cmd":"rm -rf /"}"#,
        ],
    )
    .await?;
    let out = text(&denied.stdout);
    assert_eq!(
        denied.status.code(),
        Some(1),
        "{out}{}",
        text(&denied.stderr)
    );
    assert!(
        out.lines()
            .any(|l| l == "decision  deny    by forbid-high-risk-tools, forbid-shell-exec"),
        "{out}"
    );
    // Its tree at once, as the receipt says to: `trace` waits for the
    // audit sink to write the step (no retry here).
    let denied_trace = out
        .lines()
        .find_map(|l| l.strip_prefix("trace     "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned();
    let tree = meshctl(&env, &["trace", &denied_trace]).await?;
    let tree_out = text(&tree.stdout);
    assert_eq!(
        tree.status.code(),
        Some(0),
        "{tree_out}{}",
        text(&tree.stderr)
    );
    assert_eq!(
        tree_out.lines().next(),
        Some(format!("Decision tree of trace {denied_trace}: 1 step, 1 denied").as_str()),
        "{tree_out}"
    );

    // Invalid: the worker's own receipt, with its errors.
    let invalid = meshctl(
        &env,
        &["pub", "--agent", "planner", "--type", "bogus", "-o", "json"],
    )
    .await?;
    assert_eq!(invalid.status.code(), Some(1), "{}", text(&invalid.stderr));
    let receipt = json(&invalid)?;
    assert_eq!(receipt["decision"], "invalid", "{receipt}");
    assert!(
        receipt["errors"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains("bogus")))),
        "{receipt}"
    );
    let invalid_id = receipt["event_id"].as_str().unwrap_or_default().to_owned();

    // The live tail of planner's invalid receipts saw only that one.
    let out = text(&receipts.output().await?.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("invalid") && lines[0].contains(&format!("event {invalid_id}")),
        "{out}"
    );

    // From the past: the dead letter of the invalid event, and the trace's
    // two receipts.
    let dead = meshctl(
        &env,
        &[
            "tail", "dead", "--agent", "planner", "--since", "5m", "--count", "1", "-o", "json",
        ],
    )
    .await?;
    let seen = json_lines(&dead)?;
    assert_eq!(seen.len(), 1, "{}", text(&dead.stderr));
    assert_eq!(seen[0]["decision"], "invalid");
    assert_eq!(seen[0]["subject"], "mesh.dead.planner");
    let in_trace = meshctl(
        &env,
        &[
            "tail", "receipts", "--trace", &trace, "--last", "100", "--count", "2", "-o", "json",
        ],
    )
    .await?;
    let seen = json_lines(&in_trace)?;
    let types: Vec<&str> = seen.iter().filter_map(|r| r["type"].as_str()).collect();
    assert_eq!(
        types,
        ["io.agentmesh.task.handoff", "io.agentmesh.reasoning"],
        "{}",
        text(&in_trace.stderr)
    );
    assert!(
        seen.iter()
            .all(|r| r["receipt"]["trace_id"] == trace.as_str())
    );

    read_commands_print_json(&env, &trace).await?;
    services.stop().await
}

/// `-o json` of every read command parses, with the documented fields
/// (docs/meshctl.md), on the mesh `pub` just used.
async fn read_commands_print_json(env: &[(&str, &str)], trace: &str) -> anyhow::Result<()> {
    // The audit sink has the trace's two steps.
    let last = std::sync::Mutex::new(String::new());
    let steps = testkit::eventually(testkit::WAIT, "the trace in ClickHouse", || async {
        let out = meshctl(env, &["trace", trace, "-o", "json"]).await.ok()?;
        if let Ok(mut last) = last.lock() {
            *last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        }
        let doc = json(&out).ok()?;
        (doc["steps"].as_array()?.len() == 2).then_some(doc)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; `meshctl trace` said: {}",
            last.lock().map(|l| l.clone()).unwrap_or_default()
        )
    })?;
    support::json_shapes::check("trace", &steps);
    assert_eq!(steps["trace_id"], trace);
    assert_eq!(steps["steps"][0]["type"], "io.agentmesh.task.handoff");
    assert_eq!(steps["steps"][0]["parent"], serde_json::Value::Null);

    let policies = workspace().join("policies");
    let policies = policies.to_string_lossy();
    // (arguments, the command as docs/meshctl.md names it, a field it
    // must have: `0` an element, `` an array)
    let cases: [(&[&str], &str, &str); 11] = [
        (&["status", "-o", "json"], "status", "components"),
        (&["status", "--output", "json"], "status", "tables"),
        (
            &["agents", "list", "--policies", &policies, "-o", "json"],
            "agents list",
            "0",
        ),
        (
            &["audit", "verify", "--trace", trace, "-o", "json"],
            "audit verify",
            "findings",
        ),
        (
            &["policy", "check", &policies, "-o", "json"],
            "policy check",
            "policy_hash",
        ),
        (
            &[
                "policy",
                "replay",
                "--policies",
                &policies,
                "--since",
                "10m",
                "--from",
                "jetstream",
                "-o",
                "json",
            ],
            "policy replay",
            "transitions",
        ),
        (
            &["approvals", "list", "--all", "-o", "json"],
            "approvals list",
            "",
        ),
        (&["limits", "show", "-o", "json"], "limits show", "agents"),
        (
            &["cache", "status", "-o", "json"],
            "cache status",
            "entries",
        ),
        (&["signers", "list", "-o", "json"], "signers list", "0"),
        (&["gpus", "-o", "json"], "gpus", "leases"),
    ];
    for (args, command, field) in cases {
        let out = meshctl(env, args).await?;
        let doc = json(&out).map_err(|e| anyhow::anyhow!("{args:?}: {e}"))?;
        let present = match field {
            "" => doc.is_array(),
            "0" => doc.get(0).is_some(),
            f => doc.get(f).is_some(),
        };
        assert!(present, "{args:?}: no `{field}` in {doc}");
        support::json_shapes::check(command, &doc);
    }
    Ok(())
}

/// The one line and exit code of each kind of bad input, with no server
/// (or none at the URL).
#[tokio::test]
async fn bad_input_gets_one_line_that_names_the_fix_and_its_exit_code() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().to_string_lossy().into_owned();
    let nowhere = format!("nats://127.0.0.1:{}", free_port()?);
    let ch_nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let env = [
        ("NATS_URL", nowhere.as_str()),
        ("CLICKHOUSE_URL", ch_nowhere.as_str()),
        ("AGENTMESH_HOME", home.as_str()),
    ];
    let cases: [(&[&str], i32, &str); 18] = [
        // Wrong flags: clap's usage error.
        (&["pub", "--agent", "planner"], 2, "--type"),
        (
            &["pub", "--agent", "Planner", "--type", "prompt"],
            2,
            "is not an agent id",
        ),
        (
            &["tail", "letters"],
            2,
            "possible values: receipts, deliveries, dead",
        ),
        (&["tail", "receipts", "--since", "soon"], 2, "`5m`"),
        (
            &[
                "pub", "--agent", "planner", "--type", "prompt", "--data", "{oops",
            ],
            2,
            "--data is not JSON",
        ),
        // No key where one was named.
        (
            &[
                "pub",
                "--agent",
                "planner",
                "--type",
                "prompt",
                "--nkey-file",
                "/nonexistent/planner.nk",
            ],
            5,
            "meshctl agents add planner",
        ),
        // Nothing answers at the URL.
        (
            &["pub", "--agent", "planner", "--type", "prompt"],
            3,
            "meshctl up",
        ),
        (&["tail", "receipts"], 3, "meshctl up"),
        (&["limits", "show", "-o", "json"], 3, "meshctl up"),
        (&["approvals", "list"], 3, "meshctl up"),
        (&["demo"], 3, "meshctl up"),
        // An agent that is not registered.
        (&["agents", "rotate", "nobody"], 5, "no agent `nobody`"),
        // ClickHouse, likewise.
        (
            &["trace", "0123456789abcdef0123456789abcdef", "-o", "json"],
            3,
            "meshctl up",
        ),
        // Values checked at parse time, with what is allowed.
        (
            &["--nats-url", "nats://[bad", "status"],
            2,
            "nats://HOST:PORT",
        ),
        (&["up", "--nats-nodes", "2"], 2, "possible values: 1, 3"),
        (&["trace", "not-a-trace"], 2, "is not a trace id"),
        (&["status", "-o", "yaml"], 2, "possible values: text, json"),
        (
            &["tail", "receipts", "--decision", "maybe"],
            2,
            "possible values: allow, deny, invalid",
        ),
    ];
    for (args, code, says) in cases {
        let out = meshctl(&env, args).await?;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        if !err.starts_with("error:") {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("meshctl: "), "{args:?}: {err}");
            // Each cause once (`IO error: refused: refused` says it twice).
            let parts: Vec<&str> = err.trim_end().split(": ").collect();
            assert!(
                parts.windows(2).all(|w| !w[0].ends_with(w[1])),
                "{args:?}: {err}"
            );
        }
    }
    Ok(())
}

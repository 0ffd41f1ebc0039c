//! Shared by the tests that run the Python SDK (`sdk/python`): pytest and
//! Python scripts run against the mesh the test started, and the Rust
//! `coder` they work with.

// Test helpers outside `#[test]` fns panic to fail the test, too.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails; shared by several test binaries, each using a part of it"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use agents_sdk::{
    A2aReply, A2aRequest, Agent, AgentBuilder, Delivery, EventType, Skill, ToolCall, ToolError,
    ToolSpec, payload,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The interpreter: `AGENTMESH_PYTHON`, else `.agentmesh/venv`, else
/// `python3` ([`testkit::python`]).
pub(crate) fn python() -> String {
    testkit::python()
}

/// `sdk/python` of this repository.
pub(crate) fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/python")
}

/// Fails with how to install them unless `python()` can import `modules`.
pub(crate) fn require(modules: &str) -> anyhow::Result<()> {
    let probe = Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output();
    anyhow::ensure!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the Python SDK's tests need python3 with {modules}: run `scripts/install-deps.sh` \
         (it installs them into `.agentmesh/venv`), or point AGENTMESH_PYTHON at such an \
         interpreter ({})",
        match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        }
    );
    Ok(())
}

/// Runs the example `sdk/python/examples/<script>` with `args` and `env`;
/// its stdout, or an error with its whole output when it fails.
pub(crate) async fn example(
    script: &str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
) -> anyhow::Result<String> {
    require("nats, nkeys")?;
    let path = sdk_dir().join("examples").join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(path)
            .args(args)
            .env("PYTHONPATH", sdk_dir())
            .envs(env)
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Runs pytest on `files` of the SDK's tests with `env`; fails with its
/// output unless every test ran and passed.
pub(crate) async fn pytest(
    files: &[&str],
    env: Vec<(&'static str, String)>,
) -> anyhow::Result<String> {
    // a2a-sdk (Python 3.10+) only for the A2A tests.
    require(if files.contains(&"test_a2a.py") {
        "pytest, nats, nkeys, a2a"
    } else {
        "pytest, nats, nkeys"
    })?;
    let files: Vec<String> = files.iter().map(|f| format!("tests/{f}")).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"])
            .args(&files)
            .current_dir(sdk_dir())
            // A `stack` test whose variables are missing fails, never skips.
            .env("AGENTMESH_REQUIRE_STACK", "1")
            .env_remove("AGENTMESH_NKEY_FILE")
            .envs(env)
            .output()
    })
    .await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "pytest failed:\n{text}");
    anyhow::ensure!(
        text.contains(" passed") && !text.contains(" skipped"),
        "pytest ran no tests or skipped some:\n{text}"
    );
    Ok(text)
}

/// The Rust half of the example pair: `coder` serves `code.search` over
/// `root`, answers A2A requests, handoffs and messages.
pub(crate) fn coder(root: PathBuf) -> AgentBuilder {
    Agent::builder("coder")
        .description("Searches the code")
        .skill(Skill::new("rust", "Rust programming").tag("code"))
        .a2a(|request: A2aRequest| async move {
            let text = request.text();
            if text.is_empty() {
                return Err(ToolError::new("an empty message"));
            }
            request
                .workflow()
                .reasoning(format!("A2A task {}", request.task_id()))
                .await?;
            Ok(A2aReply::text(format!("coder found: {text}")))
        })
        .tool(
            ToolSpec::new("code.search").description("Lines that contain `query`"),
            move |call: ToolCall| {
                let root = root.clone();
                async move {
                    let query: String = call.arg("query")?;
                    let mut matches = Vec::new();
                    for entry in std::fs::read_dir(&root)? {
                        let path = entry?.path();
                        let text = std::fs::read_to_string(&path)?;
                        for line in text.lines().filter(|l| l.contains(&query)) {
                            matches.push(format!("{}: {line}", path.display()));
                        }
                    }
                    Ok(json!({ "matches": matches }))
                }
            },
        )
}

/// Serves `agent`'s deliveries until the returned token is cancelled: a
/// handoff gets a reasoning step and an output in the sender's trace, a
/// message a reply.
pub(crate) fn serve_coder(agent: Agent) -> CancellationToken {
    let stop = CancellationToken::new();
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        agent
            .serve_with(shutdown, |d: Delivery| async move {
                match d.event_type() {
                    EventType::TaskHandoff => {
                        let task: payload::TaskHandoff = d.json().map_err(|e| e.to_string())?;
                        let wf = d.workflow();
                        wf.reasoning(format!("working on {}", task.task))
                            .await
                            .map_err(|e| e.to_string())?;
                        wf.output("done").await.map_err(|e| e.to_string())?;
                    }
                    EventType::Message => {
                        d.reply(json!({"verdict": "done"}))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    _ => {}
                }
                Ok::<_, String>(())
            })
            .await
            .unwrap();
    });
    stop
}

//! A tool-serving agent: `coder` serves `code.search` (a substring search
//! over the files under a directory), works on the tasks handed to it,
//! answers questions and A2A requests (`docs/a2a.md`). Its callers: the
//! `planner` example, and the Python one in `sdk/python/examples/`.
//!
//! Run the local stack (`meshctl up`, or nats-server and policy-worker),
//! then, with the coder's key (authorization on):
//! `cargo run -p agents-sdk --example tool_server -- --nkey-file .agentmesh/auth/agents/coder.nk [ROOT]`
//! (or `AGENTMESH_NKEY_FILE=.agentmesh/auth/agents/coder.nk`; no key
//! against `meshctl up --insecure`). `--nats-url` or `NATS_URL` points it
//! elsewhere (default `nats://127.0.0.1:4222`).

use std::path::{Path, PathBuf};

use agents_sdk::{
    A2aReply, A2aRequest, Agent, Delivery, EventType, Skill, ToolCall, ToolError, ToolSpec, payload,
};
use serde_json::{Value, json};

mod common;

/// Up to `limit` lines containing `query` in the files under `root`.
fn search(root: &Path, query: &str, limit: usize) -> Result<Vec<String>, ToolError> {
    let mut hits = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                for (n, line) in text.lines().enumerate().filter(|(_, l)| l.contains(query)) {
                    hits.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    if hits.len() >= limit {
                        return Ok(hits);
                    }
                }
            }
        }
    }
    Ok(hits)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let options = common::Options::parse(&["coder"])?;
    let url = options.url();
    let root: PathBuf = options.args.first().map_or(".", String::as_str).into();

    let builder = Agent::builder("coder")
        .description("Searches and changes the repository")
        .skill(Skill::new("rust", "Rust programming").tag("code"))
        .tool(
            ToolSpec::new("code.search")
                .description("Lines of the repository that contain `query`")
                .input_schema(json!({
                    "type": "object",
                    "properties": {
                        "query": {"type": "string"},
                        "limit": {"type": "integer", "minimum": 1}
                    },
                    "required": ["query"]
                })),
            move |call: ToolCall| {
                let root = root.clone();
                async move {
                    let query: String = call.arg("query")?;
                    let limit = call
                        .arguments()
                        .get("limit")
                        .and_then(Value::as_u64)
                        .unwrap_or(20);
                    let hits = search(&root, &query, limit as usize)?;
                    Ok(json!({ "matches": hits }))
                }
            },
        )
        .a2a(|request: A2aRequest| async move {
            Ok(A2aReply::text(format!("coder read: {}", request.text())))
        });
    let agent = options.keyed(builder, "coder").connect(url).await?;
    println!("coder serving `code.search` on {url}; Ctrl-C stops it");

    // Tool calls are answered by the SDK; everything else comes here.
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    agent
        .serve_with(shutdown, |d: Delivery| async move {
            if d.event_type() == EventType::TaskHandoff {
                let task: payload::TaskHandoff = d.json()?;
                println!(
                    "task from {}: {} (trace {})",
                    d.sender(),
                    task.task,
                    d.trace_id()
                );
                let wf = d.workflow();
                wf.reasoning(format!("Planning how to {}", task.task))
                    .await?;
                wf.output(format!("Done: {}", task.task)).await?;
            } else if d.event_type() == EventType::Message {
                // A question (`wf.request`), e.g. from the Python planner.
                d.reply(json!({"verdict": "done"})).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
        .await?;
    Ok(())
}

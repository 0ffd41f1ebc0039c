//! Request and reply between two agents in one process: `reviewer` answers
//! every message it gets; `planner` asks it and waits for the answer.
//!
//! Run the local stack, then, with both agents' keys (authorization on):
//! `cargo run -p agents-sdk --example request_reply -- --nkey-dir .agentmesh/auth/agents`
//! (no key against `meshctl up --insecure`).

use std::time::Duration;

use agents_sdk::{Agent, Delivery, EventType, payload};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = common::Options::parse(&["reviewer", "planner"])?;
    let url = options.url();

    // The answering side: reply to each message, in the asker's trace.
    let reviewer = options
        .keyed(Agent::builder("reviewer"), "reviewer")
        .connect(url)
        .await?;
    let stop = CancellationToken::new();
    let answering = tokio::spawn({
        let stop = stop.clone();
        async move {
            reviewer
                .serve_with(stop.cancelled_owned(), |d: Delivery| async move {
                    if d.event_type() == EventType::Message {
                        let question: payload::Message = d.json()?;
                        let diff = question.body["diff"].as_str().unwrap_or_default();
                        let verdict = if diff.contains("unwrap()") {
                            "changes requested"
                        } else {
                            "approved"
                        };
                        d.reply(json!({"verdict": verdict})).await?;
                    }
                    Ok::<_, anyhow::Error>(())
                })
                .await
        }
    });

    // The asking side.
    let planner = options
        .keyed(Agent::builder("planner"), "planner")
        .connect(url)
        .await?;
    let wf = planner.workflow();
    for diff in ["+ let n = s.parse()?;", "+ let n = s.parse().unwrap();"] {
        let reply = wf
            .request("reviewer", json!({"diff": diff}))
            .timeout(Duration::from_secs(10))
            .await?;
        let answer: payload::Message = reply.json()?;
        println!("{diff:40} -> {}", answer.body["verdict"]);
    }
    println!("meshctl trace {}", wf.trace_id());

    stop.cancel();
    answering.await??;
    Ok(())
}

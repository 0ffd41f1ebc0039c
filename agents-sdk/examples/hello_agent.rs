//! The smallest agent of your own, as `docs/quickstart.md` runs it: it
//! connects as the agent you registered (`meshctl agents add`) with that
//! agent's key, publishes one `prompt` step, waits for the policy worker's
//! decision on it (read from the agent's durable `receipts-<id>`) and
//! prints the receipt and the trace id.
//!
//! ```sh
//! target/release/examples/hello_agent summarizer --nkey-file .agentmesh/auth/agents/summarizer.nk
//! ```
//!
//! `--nkey-file` (or `AGENTMESH_NKEY_FILE`) is the agent's seed file; leave
//! it out against `meshctl up --insecure`. `--nats-url` (or `NATS_URL`)
//! picks the broker (default `nats://127.0.0.1:4222`).

use agents_sdk::Agent;

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = common::Options::parse(&[])?;
    let id = options.args.first().cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "no agent id: usage: hello_agent <agent-id> [--nkey-file PATH] (`meshctl agents add <agent-id>` registers one)"
        )
    })?;
    let agent = options
        .keyed(Agent::builder(id.as_str()).description("Says hello"), &id)
        .connect(options.url())
        .await?;
    let wf = agent.workflow();
    let step = wf.prompt("hello from Rust").await?;
    let receipt = agent.await_decision(&step.id).await?;
    println!("{}", serde_json::to_string(&receipt)?);
    println!(
        "{id}: prompt {} ({})",
        receipt.decision,
        receipt.reasons.join(", ")
    );
    println!("meshctl trace {}", wf.trace_id());
    Ok(())
}

//! The smallest agent of your own, as `docs/quickstart.md` runs it: it
//! connects as the agent you registered (`meshctl agents add`) with that
//! agent's key, publishes one `prompt` step, waits for the policy worker's
//! decision on it and prints the receipt and the trace id.
//!
//! ```sh
//! target/release/examples/hello_agent summarizer --nkey-file .agentmesh/auth/agents/summarizer.nk
//! ```
//!
//! `--nkey-file` (or `AGENTMESH_NKEY_FILE`) is the agent's seed file; leave
//! it out against `meshctl up --insecure`. `NATS_URL` picks the broker
//! (default `nats://127.0.0.1:4222`).

use agents_sdk::Agent;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut id = None;
    let mut nkey_file = std::env::var("AGENTMESH_NKEY_FILE").ok();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nkey-file" => nkey_file = args.next(),
            other if other.starts_with("--") => {
                anyhow::bail!(
                    "unknown flag `{other}`: usage: hello_agent <agent-id> [--nkey-file PATH]"
                )
            }
            other => id = Some(other.to_owned()),
        }
    }
    let id = id.ok_or_else(|| {
        anyhow::anyhow!("no agent id: usage: hello_agent <agent-id> [--nkey-file PATH]")
    })?;
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());

    let mut builder = Agent::builder(id.as_str()).description("Says hello");
    if let Some(path) = &nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the nkey file `{path}`: {e}"))?;
        builder = builder.nkey(seed.trim());
    }
    let agent = builder.connect(&url).await?;
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

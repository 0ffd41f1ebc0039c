//! `meshctl limits`: the rate and budget counters the policy worker keeps
//! in the KV bucket `mesh-limits` (what `context.rate` and `context.budget`
//! read) — show them, or reset an agent's or a workflow's counters so a
//! tripped limit lets it through again.

use anyhow::{Context, bail};
use async_nats::jetstream::{self, kv};
use chrono::Utc;
use clap::Subcommand;
use futures::TryStreamExt;
use schemas::limits::{AgentTally, WorkflowTally, agent_key, workflow_key};
use schemas::subjects;

use crate::servers::Endpoints;

/// `meshctl limits ...`
#[derive(Debug, Subcommand)]
pub(crate) enum LimitsCommand {
    /// Show every agent's counters (or one agent's), and a workflow's with --workflow.
    Show {
        /// Only this agent.
        agent: Option<String>,
        /// Also show this workflow (trace id).
        #[arg(long)]
        workflow: Option<String>,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Reset an agent's counters (and/or a workflow's): its limits start again from zero.
    Reset {
        /// The agent.
        agent: Option<String>,
        /// The workflow (trace id).
        #[arg(long)]
        workflow: Option<String>,
    },
}

/// Runs a `meshctl limits` command.
pub(crate) async fn run(command: LimitsCommand, endpoints: &Endpoints) -> anyhow::Result<bool> {
    let client = endpoints.connect_nats().await?;
    let js = jetstream::new(client);
    let store = js
        .get_key_value(subjects::BUCKET_LIMITS)
        .await
        .with_context(|| format!("KV bucket `{}`", subjects::BUCKET_LIMITS))?;
    match command {
        LimitsCommand::Show {
            agent,
            workflow,
            output,
        } => {
            let now = Utc::now().timestamp();
            let agents: Vec<String> = match agent {
                Some(a) => vec![a],
                None => {
                    let mut keys: Vec<String> = store
                        .keys()
                        .await
                        .context("listing counters")?
                        .try_collect::<Vec<String>>()
                        .await
                        .context("listing counters")?
                        .into_iter()
                        .filter_map(|k| k.strip_prefix("agent.").map(str::to_owned))
                        .collect();
                    keys.sort();
                    keys.dedup();
                    keys
                }
            };
            if output.json() {
                let mut rows = Vec::new();
                for a in agents {
                    let tally: AgentTally = read(&store, &agent_key(&a)).await?.unwrap_or_default();
                    let t = tally.at(now);
                    rows.push(serde_json::json!({
                        "agent": a,
                        "per_minute": t.per_minute,
                        "per_hour": t.per_hour,
                        "per_day": t.per_day,
                        "tokens_day": t.tokens_day,
                        "cost_micros_day": t.cost_micros_day,
                    }));
                }
                let workflow = match workflow {
                    Some(w) => {
                        let t: WorkflowTally =
                            read(&store, &workflow_key(&w)).await?.unwrap_or_default();
                        serde_json::json!({
                            "trace_id": w,
                            "events": t.events,
                            "tool_calls": t.tool_calls,
                            "tokens": t.tokens,
                            "cost_micros": t.cost_micros,
                        })
                    }
                    None => serde_json::Value::Null,
                };
                crate::output::print_json(&serde_json::json!({
                    "agents": rows,
                    "workflow": workflow,
                }))?;
                return Ok(true);
            }
            outln!(
                "{:<20} {:>8} {:>8} {:>8} {:>14} {:>12}",
                "AGENT",
                "MINUTE",
                "HOUR",
                "DAY",
                "TOKENS TODAY",
                "USD TODAY"
            );
            for a in agents {
                let tally: AgentTally = read(&store, &agent_key(&a)).await?.unwrap_or_default();
                let t = tally.at(now);
                outln!(
                    "{:<20} {:>8} {:>8} {:>8} {:>14} {:>12.4}",
                    a,
                    t.per_minute,
                    t.per_hour,
                    t.per_day,
                    t.tokens_day,
                    t.cost_micros_day as f64 / 1e6
                );
            }
            if let Some(w) = workflow {
                let t: WorkflowTally = read(&store, &workflow_key(&w)).await?.unwrap_or_default();
                outln!(
                    "\nworkflow {w}: {} events, {} tool calls, {} tokens, {:.4} USD",
                    t.events,
                    t.tool_calls,
                    t.tokens,
                    t.cost_micros as f64 / 1e6
                );
            }
            Ok(true)
        }
        LimitsCommand::Reset { agent, workflow } => {
            if agent.is_none() && workflow.is_none() {
                bail!("name what to reset: an agent, --workflow TRACE_ID, or both");
            }
            for key in agent
                .as_deref()
                .map(agent_key)
                .into_iter()
                .chain(workflow.as_deref().map(workflow_key))
            {
                store
                    .purge(&key)
                    .await
                    .with_context(|| format!("resetting `{key}`"))?;
                outln!("Reset `{key}`: its counters start again from zero.");
            }
            Ok(true)
        }
    }
}

async fn read<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> anyhow::Result<Option<T>> {
    Ok(
        match store
            .get(key)
            .await
            .with_context(|| format!("reading `{key}`"))?
        {
            Some(bytes) => serde_json::from_slice(&bytes).ok(),
            None => None,
        },
    )
}

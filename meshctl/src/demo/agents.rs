//! The demo's coder and reviewer as `agents-sdk` agents: how to serve
//! deliveries with a handler, publish each step of the workflow (reasoning,
//! tool call, memory update, handoff, output), call a tool through the mesh
//! and take a typed denial. Read this as the SDK's worked example.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agents_sdk::{Agent, CallErrorKind, Decision, Delivery, DeliveryError, EventType, payload};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::world::{Match, propose_change, review};
use super::{CODER, PLANNER, REVIEWER};

/// The ids of the workflow's events, as the agents publish them.
#[derive(Debug, Clone, Default)]
pub(super) struct Ledger(pub(super) Arc<Mutex<Vec<String>>>);

impl Ledger {
    pub(super) fn record(&self, id: impl Into<String>) {
        let id = id.into();
        if let Ok(mut ids) = self.0.lock()
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }

    pub(super) fn ids(&self) -> Vec<String> {
        self.0.lock().map(|ids| ids.clone()).unwrap_or_default()
    }
}

/// What the agents tell the planner's side as the workflow goes on.
#[derive(Debug)]
pub(super) enum Progress {
    /// A line to print.
    Note(&'static str, String),
    /// The reviewer published the final output.
    Done,
    /// An agent could not do its part.
    Failed(String),
}

/// What the coder and reviewer share with the planner's side.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub(super) trace_id: String,
    pub(super) ledger: Ledger,
    pub(super) progress: mpsc::UnboundedSender<Progress>,
    pub(super) handled: Arc<Mutex<HashSet<String>>>,
    pub(super) call_timeout: Duration,
}

/// How long a delivery of another workflow waits before JetStream offers it
/// again (to the real agent, once the demo is over).
const LEAVE_FOR: Duration = Duration::from_secs(30);

impl Shared {
    fn note(&self, agent: &'static str, line: impl Into<String>) {
        let _ = self.progress.send(Progress::Note(agent, line.into()));
    }

    fn fail(&self, why: String) {
        let _ = self.progress.send(Progress::Failed(why));
    }

    /// Whether `delivery` is this workflow's `event_type` from `from`.
    fn is_ours(&self, delivery: &Delivery, from: &str, event_type: EventType) -> bool {
        delivery.trace_id() == self.trace_id
            && delivery.sender().as_str() == from
            && delivery.event_type() == event_type
    }

    /// True the first time `id` is seen (a redelivered step is not redone).
    fn first_time(&self, id: &str) -> bool {
        self.handled
            .lock()
            .map(|mut handled| handled.insert(id.to_owned()))
            .unwrap_or(false)
    }
}

/// Hands `agent`'s deliveries to `handler` until `stop`; tells the planner's
/// side if the agent stops taking them.
pub(super) async fn serve<F, Fut>(agent: Agent, stop: CancellationToken, shared: Shared, handler: F)
where
    F: Fn(Shared, Delivery) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), DeliveryError>> + Send,
{
    let served = agent
        .serve_with(stop.cancelled_owned(), |d| handler(shared.clone(), d))
        .await;
    if let Err(e) = served {
        shared.fail(format!("{} stopped taking deliveries: {e}", agent.id()));
    }
}

/// Leaves a delivery of another workflow to the real agent.
async fn leave(me: &str, delivery: Delivery) -> Result<(), DeliveryError> {
    tracing::info!(
        agent = me,
        id = delivery.id(),
        r#type = %delivery.event_type(),
        trace = %delivery.trace_id(),
        "Not the demo's: leaving this delivery for the real agent."
    );
    delivery.nak(Some(LEAVE_FOR)).await
}

/// The coder's delivery handler.
pub(super) async fn coder_handles(shared: Shared, delivery: Delivery) -> Result<(), DeliveryError> {
    if !shared.is_ours(&delivery, PLANNER, EventType::TaskHandoff) {
        return leave(CODER, delivery).await;
    }
    if shared.first_time(delivery.id())
        && let Err(e) = code(&shared, &delivery).await
    {
        shared.fail(format!("coder: {e:#}"));
    }
    Ok(())
}

/// The coder's part: reasoning, `code.search`, `shell.exec`, memory, handoff.
async fn code(shared: &Shared, delivery: &Delivery) -> anyhow::Result<()> {
    let task: payload::TaskHandoff = delivery.json().context("reading the handoff")?;
    let wf = delivery.workflow();
    let thought = wf
        .reasoning("Find the signup handler first, then run the tests.")
        .with("task", &task.task)
        .await?;
    shared.ledger.record(&thought.id);

    let hit = search_handler(shared, &wf).await?;
    run_tests(shared, &wf, &thought.id).await?;
    let location = format!("{}:{}", hit.file, hit.line);
    let memory = wf.memory_update("signup.handler", &location).await?;
    shared.ledger.record(memory.id);
    let handoff = wf
        .handoff(
            REVIEWER,
            "Review the input validation in the signup handler",
        )
        .with(
            "context",
            json!({"file": hit.file, "diff": propose_change(&hit), "request": task.task}),
        )
        .await?;
    shared.ledger.record(&handoff.id);
    let receipt = wf
        .agent()
        .await_decision(&handoff.id)
        .timeout(shared.call_timeout)
        .await
        .context("no decision on the handoff to the reviewer")?;
    if receipt.decision != Decision::Allow {
        bail!(
            "the policy worker did not allow the handoff to {REVIEWER}: {} ({})",
            receipt.decision,
            sorted(&receipt.reasons).join(", ")
        );
    }
    Ok(())
}

/// `code.search` through the mesh, served by this very agent's tool
/// handler: where the signup handler is.
async fn search_handler(shared: &Shared, wf: &agents_sdk::Workflow) -> anyhow::Result<Match> {
    // Served by this very agent's tool handler, through the policy worker.
    let found = wf
        .call_tool("code.search", json!({"query": "fn signup", "path": "src/"}))
        .on(CODER)
        .timeout(shared.call_timeout)
        .await
        .context("calling code.search")?;
    // The call's id is recorded by the tool handler; the workflow now
    // follows the result.
    if let Some(result) = wf.last_event_id() {
        shared.ledger.record(result);
    }
    let matches: Vec<Match> =
        serde_json::from_value(found.get("matches").cloned().unwrap_or_default())
            .context("code.search answered without `matches`: is another `coder` serving it?")?;
    let hit = matches
        .into_iter()
        .next()
        .context("code.search found no signup handler")?;
    shared.note(
        CODER,
        format!(
            "code.search \"fn signup\" → {}:{} (served by {CODER})",
            hit.file, hit.line
        ),
    );

    Ok(hit)
}

/// The tests, as the reasoning (`thought`) said: through the shell, which
/// the shipped policies forbid, so the SDK's typed denial comes back.
async fn run_tests(
    shared: &Shared,
    wf: &agents_sdk::Workflow,
    thought: &str,
) -> anyhow::Result<()> {
    // The tests, as the reasoning said: through the shell, which policy
    // forbids. This call follows the reasoning, beside the search.
    let tests = wf
        .agent()
        .continue_trace(wf.trace(), Some(thought.to_owned()));
    match tests
        .call_tool("shell.exec", json!({"command": "cargo test --test signup"}))
        .timeout(shared.call_timeout)
        .await
    {
        Ok(_) => bail!(
            "shell.exec was allowed and answered; the demo expects the shipped policies, which forbid it"
        ),
        Err(e) => {
            // The call's id: the last step of `tests`.
            if let Some(call) = tests.last_event_id() {
                shared.ledger.record(call);
            }
            match (e.denial(), e.kind_ref()) {
                (Some(receipt), _) => shared.note(
                    CODER,
                    format!(
                        "shell.exec {} by {} (the SDK's typed denial)",
                        if receipt.decision == Decision::Invalid {
                            "invalid"
                        } else {
                            "denied"
                        },
                        sorted(&receipt.reasons).join(", ")
                    ),
                ),
                (None, CallErrorKind::NoProvider(_)) => shared.note(
                    CODER,
                    "shell.exec was allowed by policy, but no agent serves it",
                ),
                (None, _) => return Err(e).context("calling shell.exec"),
            }
        }
    }

    Ok(())
}

/// The reviewer's delivery handler.
pub(super) async fn reviewer_handles(
    shared: Shared,
    delivery: Delivery,
) -> Result<(), DeliveryError> {
    if !shared.is_ours(&delivery, CODER, EventType::TaskHandoff) {
        return leave(REVIEWER, delivery).await;
    }
    if shared.first_time(delivery.id()) {
        match review_change(&shared, &delivery).await {
            Ok(()) => {
                let _ = shared.progress.send(Progress::Done);
            }
            Err(e) => shared.fail(format!("reviewer: {e:#}")),
        }
    }
    Ok(())
}

/// The reviewer's part: reasoning about the diff, then the final output.
async fn review_change(shared: &Shared, delivery: &Delivery) -> anyhow::Result<()> {
    let task: payload::TaskHandoff = delivery.json().context("reading the handoff")?;
    let context = task.context.unwrap_or_default();
    let diff = context
        .get("diff")
        .and_then(Value::as_str)
        .context("the handoff carries no diff")?;
    let file = context.get("file").and_then(Value::as_str).unwrap_or("?");
    let verdict = review(diff);
    let wf = delivery.workflow();
    let thought = wf
        .reasoning(format!(
            "The diff rejects an invalid {} before the account is created.",
            if verdict.checks.is_empty() {
                "nothing".to_owned()
            } else {
                verdict.checks.join(" and ")
            }
        ))
        .await?;
    shared.ledger.record(thought.id);
    let (word, summary) = if verdict.approved {
        (
            "approved",
            format!("Validation of the email and password added to {file}."),
        )
    } else {
        (
            "changes requested",
            format!("{file} must validate both the email and the password."),
        )
    };
    let output = wf
        .output(summary.clone())
        .with("verdict", word)
        .with("checks", &verdict.checks)
        .await?;
    shared.ledger.record(output.id);
    shared.note(REVIEWER, format!("{word}: {summary}"));
    Ok(())
}

pub(super) fn sorted(reasons: &[String]) -> Vec<String> {
    let mut reasons = reasons.to_vec();
    reasons.sort();
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_keeps_each_id_once() {
        let ledger = Ledger::default();
        ledger.record("a");
        ledger.record("b");
        ledger.record("a");
        assert_eq!(ledger.ids(), ["a", "b"]);
    }
}

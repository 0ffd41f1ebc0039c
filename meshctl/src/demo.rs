//! `meshctl demo`: a planner → coder → reviewer workflow run by three
//! `agents-sdk` agents in this process, then its decision tree read back
//! from ClickHouse once every step and every decision has arrived there.
//!
//! - `coder` serves `code.search` (over a small demo repository,
//!   [`REPOSITORY`]) with an SDK tool handler. On the planner's handoff it
//!   reasons, calls `code.search` through the mesh (the policy worker decides
//!   on the call and delivers it to the handler, whose `tool.result` comes
//!   back the same way), tries `shell.exec` (forbidden by the shipped
//!   policies: the SDK's typed denial), records a memory update and hands
//!   its change to the reviewer.
//! - `reviewer` takes that handoff from its deliveries, reviews the diff
//!   ([`review`]) and publishes the final output.
//! - `planner` runs the workflow: prompt, reasoning, the handoff to the
//!   coder (whose decision it awaits), then waits for the reviewer's verdict.
//!
//! The agents use the ids of the shipped example policies and their durable
//! consumers (`agent-<id>`): deliveries of other workflows that wait there
//! are left for the real agents (refused with a delay), never consumed.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agents_sdk::{
    Agent, CallErrorKind, Decision, Delivery, DeliveryError, EventType, Skill, ToolCall, ToolSpec,
    payload,
};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::servers::Endpoints;
use crate::tree;

/// The orchestrating agent.
pub const PLANNER: &str = "planner";
/// The agent that writes code and serves `code.search`.
pub const CODER: &str = "coder";
/// The agent that reviews and gives the final output.
pub const REVIEWER: &str = "reviewer";

/// The user's prompt.
pub const TASK: &str = "Add input validation to the signup handler and get it reviewed.";

/// The demo repository that the coder's `code.search` searches: path and
/// contents.
pub const REPOSITORY: &[(&str, &str)] = &[
    (
        "src/lib.rs",
        "//! The accounts service.\n\
         pub mod db;\n\
         pub mod error;\n\
         pub mod handlers;\n",
    ),
    (
        "src/handlers/login.rs",
        "use crate::db::Users;\n\
         use crate::error::ApiError;\n\
         \n\
         /// Checks a password and opens a session.\n\
         pub async fn login(users: &Users, email: &str, password: &str) -> Result<Session, ApiError> {\n\
         \x20   let user = users.find(email).await?.ok_or(ApiError::Unauthorized)?;\n\
         \x20   user.verify(password)?;\n\
         \x20   Ok(Session::open(&user))\n\
         }\n",
    ),
    (
        "src/handlers/signup.rs",
        "use crate::db::Users;\n\
         use crate::error::ApiError;\n\
         \n\
         /// What the signup form posts.\n\
         pub struct SignupForm {\n\
         \x20   pub email: String,\n\
         \x20   pub password: String,\n\
         }\n\
         \n\
         /// Creates an account.\n\
         pub async fn signup(users: &Users, form: SignupForm) -> Result<UserId, ApiError> {\n\
         \x20   let hash = hash_password(&form.password)?;\n\
         \x20   users.insert(&form.email, &hash).await\n\
         }\n",
    ),
    (
        "tests/signup.rs",
        "#[tokio::test]\n\
         async fn signup_creates_the_account() {\n\
         \x20   let users = Users::in_memory();\n\
         \x20   signup(&users, form(\"ada@example.com\", \"correct horse battery\")).await.unwrap();\n\
         }\n",
    ),
];

/// One line `code.search` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    /// The file.
    pub file: String,
    /// The line number, from 1.
    pub line: usize,
    /// The line, trimmed.
    pub text: String,
}

/// `code.search`: the lines of [`REPOSITORY`] files under `path` that
/// contain `query`.
pub fn search(query: &str, path: &str) -> Vec<Match> {
    REPOSITORY
        .iter()
        .filter(|(file, _)| file.starts_with(path))
        .flat_map(|(file, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| line.contains(query))
                .map(|(i, line)| Match {
                    file: (*file).to_owned(),
                    line: i + 1,
                    text: line.trim().to_owned(),
                })
        })
        .collect()
}

/// The arguments of `code.search`.
#[derive(Debug, Deserialize)]
struct SearchArgs {
    query: String,
    #[serde(default)]
    path: String,
}

/// The change the coder proposes for the handler found at `at`: checks of
/// the email and the password at the top of the function, as a diff.
pub fn propose_change(at: &Match) -> String {
    format!(
        "--- a/{file}\n+++ b/{file}\n@@ -{line} +{line},3 @@\n {text}\n\
         +    if !form.email.contains('@') {{ return Err(ApiError::invalid(\"email\")); }}\n\
         +    if form.password.len() < 12 {{ return Err(ApiError::invalid(\"password\")); }}\n",
        file = at.file,
        line = at.line,
        text = at.text,
    )
}

/// What the reviewer makes of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    /// The fields the added lines validate, in order.
    pub checks: Vec<String>,
    /// Whether both the email and the password are validated.
    pub approved: bool,
}

/// Reviews a diff: which fields its added lines reject with
/// `ApiError::invalid("<field>")`.
pub fn review(diff: &str) -> Review {
    let checks: Vec<String> = diff
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++") && l.contains("return Err"))
        .filter_map(|l| {
            let rest = l.split("ApiError::invalid(\"").nth(1)?;
            rest.split('"').next().map(str::to_owned)
        })
        .collect();
    let approved = ["email", "password"]
        .iter()
        .all(|field| checks.iter().any(|c| c == field));
    Review { checks, approved }
}

/// The ids of the workflow's events, as the agents publish them.
#[derive(Debug, Clone, Default)]
struct Ledger(Arc<Mutex<Vec<String>>>);

impl Ledger {
    fn record(&self, id: impl Into<String>) {
        let id = id.into();
        if let Ok(mut ids) = self.0.lock()
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }

    fn ids(&self) -> Vec<String> {
        self.0.lock().map(|ids| ids.clone()).unwrap_or_default()
    }
}

/// What the agents tell the planner's side as the workflow goes on.
#[derive(Debug)]
enum Progress {
    /// A line to print.
    Note(&'static str, String),
    /// The reviewer published the final output.
    Done,
    /// An agent could not do its part.
    Failed(String),
}

/// What the coder and reviewer share with the planner's side.
#[derive(Debug, Clone)]
struct Shared {
    trace_id: String,
    ledger: Ledger,
    progress: mpsc::UnboundedSender<Progress>,
    handled: Arc<Mutex<HashSet<String>>>,
    call_timeout: Duration,
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
async fn serve<F, Fut>(agent: Agent, stop: CancellationToken, shared: Shared, handler: F)
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
async fn coder_handles(shared: Shared, delivery: Delivery) -> Result<(), DeliveryError> {
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
        .first()
        .context("code.search found no signup handler")?;
    shared.note(
        CODER,
        format!(
            "code.search \"fn signup\" → {}:{} (served by {CODER})",
            hit.file, hit.line
        ),
    );

    // The tests, as the reasoning said: through the shell, which policy
    // forbids. This call follows the reasoning, beside the search.
    let tests = wf
        .agent()
        .continue_trace(wf.trace(), Some(thought.id.clone()));
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
            json!({"file": hit.file, "diff": propose_change(hit), "request": task.task}),
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

/// The reviewer's delivery handler.
async fn reviewer_handles(shared: Shared, delivery: Delivery) -> Result<(), DeliveryError> {
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

fn sorted(reasons: &[String]) -> Vec<String> {
    let mut reasons = reasons.to_vec();
    reasons.sort();
    reasons
}

/// The nkey seed an agent connects with (`None`: no credentials).
pub type SeedOf<'a> = dyn Fn(&str) -> anyhow::Result<Option<String>> + 'a;

/// The finished workflow: its trace and the ids of all its events.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The trace id (32 hex characters).
    pub trace_id: String,
    /// Every event the agents published, including the tool's result.
    pub ids: Vec<String>,
}

/// Runs the workflow with the three agents against the mesh at `nats_url`,
/// printing what each does, until the reviewer's output or `deadline`.
pub async fn run_workflow(
    nats_url: &str,
    seed_of: &SeedOf<'_>,
    deadline: Instant,
) -> anyhow::Result<Ran> {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    // On a mesh with authorization each agent signs in with its own nkey.
    let keyed = |id: &str, builder: agents_sdk::AgentBuilder| -> anyhow::Result<_> {
        Ok(match seed_of(id)? {
            Some(seed) => builder.nkey(seed),
            None => builder,
        })
    };
    let planner = keyed(PLANNER, Agent::builder(PLANNER))?
        .description("Breaks a request down and hands the parts to the right agents")
        .skill(Skill::new("planning", "Planning").tag("orchestration"))
        .connect(nats_url)
        .await
        .context("connecting the planner")?;
    let wf = planner.workflow();
    let trace_id = wf.trace_id();
    let ledger = Ledger::default();

    let served = ledger.clone();
    let our_trace = trace_id.clone();
    let coder = keyed(CODER, Agent::builder(CODER))?
        .description("Writes code in the demo repository")
        .skill(Skill::new("rust", "Rust programming").tag("code"))
        .tool(
            ToolSpec::new("code.search")
                .description("Lines of the demo repository that contain `query`, under `path`")
                .input_schema(json!({
                    "type": "object",
                    "properties": {"query": {"type": "string"}, "path": {"type": "string"}},
                    "required": ["query"]
                })),
            move |call: ToolCall| {
                if call.trace().trace_id_hex() == our_trace {
                    served.record(call.id());
                }
                async move {
                    let args: SearchArgs = call.args()?;
                    let matches = search(&args.query, &args.path);
                    Ok(json!({"matches": matches, "files": REPOSITORY.len()}))
                }
            },
        )
        .connect(nats_url)
        .await
        .context("connecting the coder")?;
    let reviewer = keyed(REVIEWER, Agent::builder(REVIEWER))?
        .description("Reviews changes and gives the verdict")
        .skill(Skill::new("review", "Code review").tag("code"))
        .connect(nats_url)
        .await
        .context("connecting the reviewer")?;

    let (progress, mut updates) = mpsc::unbounded_channel();
    let shared = Shared {
        trace_id: trace_id.clone(),
        ledger: ledger.clone(),
        progress: progress.clone(),
        handled: Arc::default(),
        call_timeout: remaining().min(agents_sdk::DEFAULT_CALL_TIMEOUT),
    };
    let stop = CancellationToken::new();
    let mut serving = tokio::task::JoinSet::new();
    serving.spawn(serve(
        coder.clone(),
        stop.clone(),
        shared.clone(),
        coder_handles,
    ));
    serving.spawn(serve(
        reviewer.clone(),
        stop.clone(),
        shared.clone(),
        reviewer_handles,
    ));

    let result = async {
        println!("Trace {trace_id}: {PLANNER} → {CODER} → {REVIEWER}, agents-sdk agents");
        let prompt = wf.prompt(TASK).with("role", "user").await?;
        ledger.record(prompt.id);
        let thought = wf
            .reasoning("Two parts: the coder changes the handler, the reviewer checks the change.")
            .await?;
        ledger.record(thought.id);
        let handoff = wf
            .handoff(CODER, "Validate the email and password in the signup handler")
            .with(
                "context",
                json!({"acceptance": "invalid input is rejected with a clear error; the tests pass"}),
            )
            .await?;
        ledger.record(&handoff.id);
        let receipt = planner
            .await_decision(&handoff.id)
            .timeout(remaining())
            .await
            .context("no decision on the planner's handoff: is the policy worker running (`meshctl status`)?")?;
        if receipt.decision != Decision::Allow {
            bail!(
                "the policy worker did not allow the handoff to {CODER}: {} ({})",
                receipt.decision,
                sorted(&receipt.reasons).join(", ")
            );
        }
        print_note(
            PLANNER,
            &format!(
                "task.handoff → {CODER}: allowed by {}",
                sorted(&receipt.reasons).join(", ")
            ),
        );
        loop {
            match tokio::time::timeout(remaining(), updates.recv()).await {
                Ok(Some(Progress::Note(agent, line))) => print_note(agent, &line),
                Ok(Some(Progress::Done)) => break,
                Ok(Some(Progress::Failed(why))) => bail!("{why}"),
                Ok(None) => bail!("the agents stopped"),
                Err(_) => bail!(
                    "the workflow did not finish in time: the coder and the reviewer run in this \
                     process and get their work from the policy worker (`meshctl status`)"
                ),
            }
        }
        Ok(())
    }
    .await;

    stop.cancel();
    while serving.join_next().await.is_some() {}
    for agent in [&planner, &coder, &reviewer] {
        if let Err(e) = agent.close().await {
            tracing::warn!(agent = %agent.id(), error = %e, "Could not flush on close.");
        }
    }
    result?;
    Ok(Ran {
        trace_id,
        ids: ledger.ids(),
    })
}

fn print_note(agent: &str, line: &str) {
    println!("  {agent:<9} {line}");
}

/// `meshctl demo` once NATS and ClickHouse answer: runs the workflow,
/// waits for its rows in ClickHouse and prints the decision tree.
pub async fn run(
    endpoints: &Endpoints,
    seed_of: &SeedOf<'_>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let ran = run_workflow(&endpoints.nats_url, seed_of, deadline).await?;
    println!(
        "Published {} steps of trace {}; waiting for their decisions in ClickHouse…",
        ran.ids.len(),
        ran.trace_id
    );
    let left = deadline.saturating_duration_since(Instant::now());
    let nodes = wait_for_tree(endpoints, &ran.trace_id, &ran.ids, left).await?;
    println!();
    print!("{}", tree::render(&ran.trace_id, &nodes));
    println!("\nAgain: meshctl trace {}", ran.trace_id);
    Ok(())
}

/// Polls ClickHouse until every one of `ids` has its event row and its
/// decision, then returns the tree.
pub async fn wait_for_tree(
    endpoints: &Endpoints,
    trace_id: &str,
    ids: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<tree::Node>> {
    let client = endpoints.audit_db();
    let deadline = Instant::now() + timeout;
    let mut last = (0, 0);
    loop {
        match tree::fetch(&client, trace_id).await {
            Ok(nodes) => {
                let present = ids
                    .iter()
                    .filter(|id| nodes.iter().any(|n| &n.event_id == *id))
                    .count();
                let decided = ids
                    .iter()
                    .filter(|id| {
                        nodes
                            .iter()
                            .any(|n| &n.event_id == *id && !n.decision.is_empty())
                    })
                    .count();
                if present == ids.len() && decided == ids.len() {
                    return Ok(nodes);
                }
                last = (present, decided);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            let (present, decided) = last;
            bail!(
                "after {timeout:?}, ClickHouse has {present}/{n} of the demo's events and {decided}/{n} decisions for trace {trace_id}: \
                 is the stack up (`meshctl status`)? The policy worker decides, the audit sink writes to ClickHouse.",
                n = ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_the_handler_under_the_path() {
        let found = search("fn signup", "src/");
        assert_eq!(
            found,
            vec![Match {
                file: "src/handlers/signup.rs".into(),
                line: 11,
                text: "pub async fn signup(users: &Users, form: SignupForm) -> Result<UserId, ApiError> {".into(),
            }]
        );
        // The test file matches `signup` too, but is not under `src/`.
        assert_eq!(search("signup(", "tests/").len(), 1);
        assert_eq!(search("signup(", "").len(), 2);
        assert!(search("fn nothing_like_this", "").is_empty());
    }

    #[test]
    fn the_proposed_change_passes_review_and_a_partial_one_does_not() {
        let hit = &search("fn signup", "src/")[0];
        let diff = propose_change(hit);
        assert!(diff.starts_with(
            "--- a/src/handlers/signup.rs\n+++ b/src/handlers/signup.rs\n@@ -11 +11,3 @@\n"
        ));
        assert_eq!(
            review(&diff),
            Review {
                checks: vec!["email".into(), "password".into()],
                approved: true
            }
        );
        let partial: String = diff
            .lines()
            .filter(|l| !l.contains("\"password\""))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            review(&partial),
            Review {
                checks: vec!["email".into()],
                approved: false
            }
        );
        // Removed lines are not checks.
        assert!(
            review("-    if x { return Err(ApiError::invalid(\"email\")); }")
                .checks
                .is_empty()
        );
    }

    #[test]
    fn the_agents_are_in_the_shipped_entities() {
        let entities = include_str!("../../policies/entities.json");
        for agent in [PLANNER, CODER, REVIEWER] {
            assert!(schemas::AgentId::new(agent).is_ok());
            assert!(
                entities.contains(&format!("\"type\": \"Agent\", \"id\": \"{agent}\"")),
                "{agent}"
            );
        }
        for tool in ["code.search", "shell.exec"] {
            assert!(entities.contains(&format!("\"type\": \"Tool\", \"id\": \"{tool}\"")));
        }
    }

    #[test]
    fn the_ledger_keeps_each_id_once() {
        let ledger = Ledger::default();
        ledger.record("a");
        ledger.record("b");
        ledger.record("a");
        assert_eq!(ledger.ids(), ["a", "b"]);
    }
}

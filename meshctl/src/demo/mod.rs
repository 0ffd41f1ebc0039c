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
//!   ([`world::review`]) and publishes the final output.
//! - `planner` runs the workflow: prompt, reasoning, the handoff to the
//!   coder (whose decision it awaits), then waits for the reviewer's verdict.
//!
//! The agents use the ids of the shipped example policies and their durable
//! consumers (`agent-<id>`): deliveries of other workflows that wait there
//! are left for the real agents (refused with a delay), never consumed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agents_sdk::{Agent, Decision, Skill, ToolCall, ToolSpec};
use anyhow::{Context, bail};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::identity::AuthState;
use crate::procs::Home;
use crate::servers::{self, Endpoints};
use crate::stack;
use crate::tree;

mod agents;
mod world;

use agents::{Ledger, Progress, Shared, coder_handles, reviewer_handles, serve, sorted};
use world::SearchArgs;
pub(crate) use world::{REPOSITORY, search};

/// The orchestrating agent.
pub(crate) const PLANNER: &str = "planner";
/// The agent that writes code and serves `code.search`.
pub(crate) const CODER: &str = "coder";
/// The agent that reviews and gives the final output.
pub(crate) const REVIEWER: &str = "reviewer";

/// The user's prompt.
pub(crate) const TASK: &str = "Add input validation to the signup handler and get it reviewed.";

/// The nkey seed an agent connects with (`None`: no credentials).
pub(crate) type SeedOf<'a> = dyn Fn(&str) -> anyhow::Result<Option<String>> + 'a;

/// The finished workflow: its trace and the ids of all its events.
#[derive(Debug, Clone)]
pub(crate) struct Ran {
    /// The trace id (32 hex characters).
    pub trace_id: String,
    /// Every event the agents published, including the tool's result.
    pub ids: Vec<String>,
}

/// Runs the workflow with the three agents against the mesh at `nats_url`,
/// printing what each does, until the reviewer's output or `deadline`.
pub(crate) async fn run_workflow(
    nats_url: &str,
    seed_of: &SeedOf<'_>,
    deadline: Instant,
) -> anyhow::Result<Ran> {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let planner = keyed(seed_of, PLANNER)?
        .description("Breaks a request down and hands the parts to the right agents")
        .skill(Skill::new("planning", "Planning").tag("orchestration"))
        .connect(nats_url)
        .await
        .context("connecting the planner")?;
    let wf = planner.workflow();
    let trace_id = wf.trace_id();
    let ledger = Ledger::default();
    let (coder, reviewer) = connect_workers(nats_url, seed_of, &trace_id, &ledger).await?;

    let (progress, updates) = mpsc::unbounded_channel();
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

    let result = plan(&planner, &wf, &ledger, deadline, updates).await;

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

/// The builder of agent `id`, with its own nkey on a mesh with authorization.
fn keyed(seed_of: &SeedOf<'_>, id: &str) -> anyhow::Result<agents_sdk::AgentBuilder> {
    let builder = Agent::builder(id);
    Ok(match seed_of(id)? {
        Some(seed) => builder.nkey(seed),
        None => builder,
    })
}

/// The coder (serving `code.search`, recording this trace's calls in
/// `ledger`) and the reviewer, connected.
async fn connect_workers(
    nats_url: &str,
    seed_of: &SeedOf<'_>,
    trace_id: &str,
    ledger: &Ledger,
) -> anyhow::Result<(Agent, Agent)> {
    let served = ledger.clone();
    let our_trace = trace_id.to_owned();
    let coder = keyed(seed_of, CODER)?
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
    let reviewer = keyed(seed_of, REVIEWER)?
        .description("Reviews changes and gives the verdict")
        .skill(Skill::new("review", "Code review").tag("code"))
        .connect(nats_url)
        .await
        .context("connecting the reviewer")?;

    Ok((coder, reviewer))
}

/// The planner's part: prompt, reasoning, the handoff to the coder (whose
/// decision it awaits), then the coder's and reviewer's progress until the
/// reviewer's output.
async fn plan(
    planner: &Agent,
    wf: &agents_sdk::Workflow,
    ledger: &Ledger,
    deadline: Instant,
    mut updates: mpsc::UnboundedReceiver<Progress>,
) -> anyhow::Result<()> {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let trace_id = wf.trace_id();
    outln!("Trace {trace_id}: {PLANNER} → {CODER} → {REVIEWER}, agents-sdk agents");
    let prompt = wf.prompt(TASK).with("role", "user").await?;
    ledger.record(prompt.id);
    let thought = wf
        .reasoning("Two parts: the coder changes the handler, the reviewer checks the change.")
        .await?;
    ledger.record(thought.id);
    let handoff = wf
        .handoff(
            CODER,
            "Validate the email and password in the signup handler",
        )
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

fn print_note(agent: &str, line: &str) {
    outln!("  {agent:<9} {line}");
}

/// `meshctl demo`: checks that NATS and ClickHouse answer, gives each
/// agent its key on a stack with authorization, runs the workflow and shows
/// its decision tree.
pub(crate) async fn run(
    home: &Home,
    endpoints: &Endpoints,
    timeout: Duration,
) -> anyhow::Result<()> {
    let seeds = stack::auth_mode(home).then(|| AuthState::new(home));
    let seeds = seeds.as_ref();
    match servers::nats_state(endpoints).await {
        servers::NatsState::JetStream => {}
        servers::NatsState::Refused => {
            return Err(crate::exit::fail(
                crate::exit::Exit::Refused,
                format!(
                    "the NATS server at {} refuses meshctl's credentials: is it the stack of this `.agentmesh/` (`meshctl status`)?",
                    endpoints.nats_url
                ),
            ));
        }
        _ => {
            return Err(crate::exit::fail(
                crate::exit::Exit::Unreachable,
                format!(
                    "no NATS server with JetStream answers at {}: start the stack with `meshctl up --detach`",
                    endpoints.nats_url
                ),
            ));
        }
    }
    if servers::clickhouse_version(&endpoints.clickhouse())
        .await
        .is_none()
    {
        return Err(crate::exit::fail(
            crate::exit::Exit::Unreachable,
            format!(
                "no ClickHouse answers at {}: start the stack with `meshctl up --detach`",
                endpoints.clickhouse_url
            ),
        ));
    }
    let js = async_nats::jetstream::new(endpoints.connect_nats().await?);
    // The streams as they are: their replica count (a cluster's 3) and an
    // operator's max age stay.
    broker_config::apply(&js, &broker_options(&js).await?.with_max_age_days(None)).await?;
    // Each demo agent connects with its own key on a stack with authorization.
    let seed_of = |id: &str| -> anyhow::Result<Option<String>> {
        let Some(state) = seeds else {
            return Ok(None);
        };
        let file = state.seed_file(broker_config::auth::Role::Agent, id);
        let (seed, _) = broker_config::credentials::read_seed_file(&file).map_err(|e| {
            anyhow::anyhow!(
                "agent `{id}` has no usable key ({e}): `meshctl up` registers the agents of entities.json, or `meshctl agents add {id} --role …`"
            )
        })?;
        Ok(Some(seed))
    };
    run_and_show(endpoints, &seed_of, timeout).await
}

/// The options the demo applies the streams with: the replica count the
/// services gave them (3 on a cluster, `AGENTMESH_STREAM_REPLICAS`), so that
/// the demo never moves a cluster's streams to one replica; one replica
/// where they do not exist yet.
async fn broker_options(
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<broker_config::Options> {
    use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};
    let replicas = match js.get_stream(schemas::subjects::STREAM_INGRESS).await {
        Ok(mut stream) => stream
            .info()
            .await
            .context("reading the MESH_INGRESS stream's settings")?
            .config
            .num_replicas
            .max(1),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => 1,
            _ => return Err(anyhow::Error::new(e).context("looking up the MESH_INGRESS stream")),
        },
    };
    Ok(broker_config::Options {
        replicas,
        ..broker_config::Options::default()
    })
}

/// Runs the workflow, waits for its rows in ClickHouse and prints the
/// decision tree.
async fn run_and_show(
    endpoints: &Endpoints,
    seed_of: &SeedOf<'_>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let ran = run_workflow(&endpoints.nats_url, seed_of, deadline).await?;
    outln!(
        "Published {} steps of trace {}; waiting for their decisions in ClickHouse…",
        ran.ids.len(),
        ran.trace_id
    );
    let left = deadline.saturating_duration_since(Instant::now());
    let nodes = wait_for_tree(endpoints, &ran.trace_id, &ran.ids, left).await?;
    outln!();
    out!("{}", tree::render(&ran.trace_id, &nodes));
    outln!("\nAgain: meshctl trace {}", ran.trace_id);
    Ok(())
}

/// Polls ClickHouse until every one of `ids` has its event row and its
/// decision, then returns the tree.
pub(crate) async fn wait_for_tree(
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

    /// On a 3-node cluster whose services made the streams with 3 replicas,
    /// the demo applies them with 3 too (the defaults would move them to 1).
    #[tokio::test]
    async fn the_demo_keeps_the_replicas_of_a_clusters_streams() -> anyhow::Result<()> {
        let cluster = testkit::NatsCluster::start().await?;
        let js = async_nats::jetstream::new(cluster.connect().await?);
        assert_eq!(broker_options(&js).await?.replicas, 1, "no streams yet");
        let three = broker_config::Options {
            replicas: 3,
            ..broker_config::Options::default()
        };
        broker_config::apply(&js, &three).await?;
        let options = broker_options(&js).await?;
        assert_eq!(options.replicas, 3);
        broker_config::apply(&js, &options).await?;
        for stream in broker_config::streams(&options) {
            let mut stream = js.get_stream(&stream.name).await?;
            assert_eq!(stream.info().await?.config.num_replicas, 3);
        }
        Ok(())
    }

    #[test]
    fn the_agents_are_in_the_shipped_entities() {
        let entities = include_str!("../../../policies/entities.json");
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
}

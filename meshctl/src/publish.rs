//! `meshctl pub`: one CloudEvent published as a registered agent, with the
//! agent's own key, on its ingress subject (a JetStream publish with the
//! contract's `Nats-Msg-Id`), then its receipt read back from
//! `MESH_DECISION` and printed.
//!
//! The receipt is read from a fresh ordered consumer filtered to the
//! agent's decision subject, created before the publish (so it cannot be
//! missed) with meshctl's own credentials, which leaves the agent's durable
//! `receipts-<agent>` to the agent. Without operator credentials (an agent
//! key alone, a stack elsewhere) it subscribes to the agent's decision
//! subject with the agent's key before publishing. Not the durable: it
//! would take the agent's other receipts and hand them back, and behind a
//! backlog of unacknowledged ones this receipt might not come at all. A
//! core subscription may see a receipt twice (docs/contract.md); the first
//! for this event's id is taken.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use broker_config::auth::Role;
use futures::StreamExt as _;
use schemas::{DecisionReceipt, EventBuilder as _, EventBuilderV10, TYPE_PREFIX, TraceParent, ext};
use serde::Serialize;

use crate::exit::{Exit, fail};
use crate::identity::AuthState;
use crate::output::{OutputArg, parse_duration, print_json};
use crate::procs::Home;
use crate::servers::Endpoints;

/// `meshctl pub`'s flags.
#[derive(Debug, clap::Args)]
pub(crate) struct PubArgs {
    /// The publishing agent: a registered agent id; its key is `.agentmesh/auth/agents/<agent>.nk` unless --nkey-file names one.
    #[arg(long, short = 'a', value_parser = parse_agent)]
    agent: String,
    /// The event type: a name of the catalogue (prompt, reasoning, action, observation, tool.call, tool.result, memory.update, task.handoff, message, output) or a whole `io.agentmesh.*` type; anything else is published as given, and the worker answers `invalid`.
    #[arg(long = "type", short = 't', value_name = "TYPE")]
    event_type: String,
    /// The recipient agent (`target`): the event is delivered to it when allowed.
    #[arg(long, value_parser = parse_agent)]
    target: Option<String>,
    /// The event's `subject` (the tool's name for a `tool.call`).
    #[arg(long)]
    subject: Option<String>,
    /// The event's data, JSON (e.g. '{"text":"hello"}'; a string is '"hello"').
    #[arg(long, conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the event's data (JSON) from this file, `-` for stdin.
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
    /// The workflow's trace id (32 hex characters); default: a new trace.
    #[arg(long, value_parser = parse_trace_id)]
    trace: Option<String>,
    /// The id of the event this one follows (`causationid`).
    #[arg(long, value_name = "EVENT_ID")]
    causation: Option<String>,
    /// The agent that published the event named by --causation (`causationsource`).
    #[arg(long, requires = "causation", value_parser = parse_agent)]
    causation_agent: Option<String>,
    /// The event id (default: a new UUIDv7).
    #[arg(long)]
    id: Option<String>,
    /// The agent's nkey seed file (default: `.agentmesh/auth/agents/<agent>.nk`, which `meshctl agents add` writes).
    #[arg(long, env = "AGENTMESH_NKEY_FILE", value_name = "FILE")]
    nkey_file: Option<PathBuf>,
    /// How long to wait for the receipt (e.g. `10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    wait: Duration,
    /// Publish and print the event id; do not wait for the receipt.
    #[arg(long, conflicts_with = "wait")]
    no_wait: bool,
    #[command(flatten)]
    output: OutputArg,
}

/// An agent id, checked at parse time.
pub(crate) fn parse_agent(text: &str) -> Result<String, String> {
    if schemas::AgentId::is_valid(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "`{text}` is not an agent id: lowercase letters, digits, `_` and `-`, at most 63, starting with a letter or digit"
        ))
    }
}

/// A trace id (32 lowercase hex characters), checked at parse time.
pub(crate) fn parse_trace_id(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    if lower.len() == 32 && lower.bytes().all(|b| b.is_ascii_hexdigit()) && lower != "0".repeat(32)
    {
        Ok(lower)
    } else {
        Err(format!(
            "`{text}` is not a trace id: 32 hex characters, not all zero"
        ))
    }
}

/// The whole type of `given`: catalogue names get the `io.agentmesh.` prefix.
fn full_type(given: &str) -> String {
    let catalogue_name = schemas::EventType::ALL
        .iter()
        .any(|t| t.short_name() == given);
    let plain_word = !given.contains(['.', '/', ':']);
    if catalogue_name || plain_word {
        format!("{TYPE_PREFIX}{given}")
    } else {
        given.to_owned()
    }
}

/// The `<step>` token of the ingress subject: the type's short name with
/// `.` as `_` (`tool.call` → `tool_call`), as the SDKs name it.
fn step_token(event_type: &str) -> String {
    let short = event_type.strip_prefix(TYPE_PREFIX).unwrap_or(event_type);
    let token: String = short
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if token.is_empty() {
        "step".to_owned()
    } else {
        token
    }
}

/// Where the agent's key comes from.
fn seed_of(home: &Home, agent: &str, nkey_file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let read = |path: &Path| -> anyhow::Result<String> {
        if !path.is_file() {
            return Err(fail(
                Exit::NotFound,
                format!(
                    "no seed file `{}` for agent `{agent}`: register the agent (`meshctl agents add {agent} --role <role>`) or pass its key with --nkey-file",
                    path.display()
                ),
            ));
        }
        let (seed, _) = broker_config::credentials::read_seed_file(path)
            .with_context(|| format!("reading agent `{agent}`'s key"))?;
        Ok(seed)
    };
    if let Some(path) = nkey_file {
        return read(path).map(Some);
    }
    let state = AuthState::new(home);
    let default = state.seed_file(Role::Agent, agent);
    if default.is_file() {
        return read(&default).map(Some);
    }
    if crate::stack::auth_mode(home) {
        let known = state.agents()?.into_iter().any(|e| e.name == agent);
        return Err(fail(
            Exit::NotFound,
            if known {
                format!(
                    "agent `{agent}` has no seed file `{}`: give it a new key (`meshctl agents rotate {agent}`) or pass its key with --nkey-file",
                    default.display()
                )
            } else {
                format!(
                    "no agent `{agent}` is registered (`meshctl agents list`): register it with `meshctl agents add {agent} --role <role> --attr team=<team>`, or pass its key with --nkey-file"
                )
            },
        ));
    }
    // A stack without authorization (`meshctl up --insecure`): meshctl's
    // own credentials, if any, publish for the agent.
    Ok(None)
}

async fn connect_as_agent(
    endpoints: &Endpoints,
    agent: &str,
    seed: Option<&str>,
) -> anyhow::Result<async_nats::Client> {
    let options = match seed {
        Some(seed) => async_nats::ConnectOptions::new()
            .name(format!("meshctl pub ({agent})").as_str())
            .nkey(seed.to_owned()),
        None => endpoints.nats_options().await?,
    };
    match schemas::servers::connect(options.max_reconnects(3), &endpoints.nats_url).await {
        Ok(client) => Ok(client),
        Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation => Err(fail(
            Exit::Refused,
            format!(
                "NATS at {} refused agent `{agent}`'s key: is `{agent}` registered on this stack (`meshctl agents list`)? After `meshctl agents rotate` pass the new seed file",
                endpoints.nats_url
            ),
        )),
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("connecting to NATS at {}", endpoints.nats_url)))
        }
    }
}

/// Where the receipt is read from.
enum Receipts {
    /// A fresh ordered consumer of meshctl's own.
    Ordered(Box<consumer::pull::Ordered>),
    /// A subscription to `mesh.decision.<agent>` with the agent's key.
    Subscription(async_nats::Subscriber),
}

impl Receipts {
    /// Opens the reader before the publish: an ordered consumer with
    /// meshctl's credentials when they reach `MESH_DECISION`, else a
    /// subscription over the agent's own connection.
    async fn open(
        endpoints: &Endpoints,
        agent_client: &async_nats::Client,
        agent: &str,
        own_credentials: bool,
    ) -> anyhow::Result<Self> {
        let agent_js = jetstream::new(agent_client.clone());
        let ordered = |js: jetstream::Context| async move {
            let stream = js.get_stream(schemas::subjects::STREAM_DECISION).await?;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: schemas::subjects::decision(agent),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(consumer.messages().await?)
        };
        if own_credentials {
            return ordered(agent_js.clone())
                .await
                .map(|m| Receipts::Ordered(Box::new(m)));
        }
        if let Ok(client) = endpoints.connect_nats().await
            && let Ok(messages) = ordered(jetstream::new(client)).await
        {
            return Ok(Receipts::Ordered(Box::new(messages)));
        }
        let subscription = agent_client
            .subscribe(schemas::subjects::decision(agent))
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to agent `{agent}`'s receipts: {e}"))?;
        // The server has the subscription before the event is published.
        agent_client
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to agent `{agent}`'s receipts: {e}"))?;
        Ok(Receipts::Subscription(subscription))
    }

    /// The receipt of event `id`, or `None` at the end of the stream.
    async fn receipt_of(&mut self, id: &str) -> anyhow::Result<Option<DecisionReceipt>> {
        loop {
            let payload = match self {
                Receipts::Ordered(messages) => match messages.next().await {
                    Some(m) => m
                        .map_err(|e| anyhow::anyhow!("reading receipts: {e}"))?
                        .payload
                        .clone(),
                    None => return Ok(None),
                },
                Receipts::Subscription(subscription) => match subscription.next().await {
                    Some(m) => m.payload,
                    None => return Ok(None),
                },
            };
            if let Ok(receipt) = serde_json::from_slice::<DecisionReceipt>(&payload)
                && receipt.event_id == id
            {
                return Ok(Some(receipt));
            }
        }
    }
}

/// What `pub -o json --no-wait` prints.
#[derive(Serialize)]
struct Published<'a> {
    event_id: &'a str,
    trace_id: &'a str,
    subject: &'a str,
    stream: &'a str,
    sequence: u64,
}

/// `meshctl pub`.
pub(crate) async fn run(home: &Home, endpoints: &Endpoints, args: PubArgs) -> anyhow::Result<Exit> {
    let agent = args.agent.as_str();
    let data = match (&args.data, &args.data_file) {
        (Some(text), _) => Some(parse_data(text, "--data")?),
        (None, Some(path)) => {
            let text = if path == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("reading the data from stdin")?
            } else {
                std::fs::read_to_string(path).map_err(|e| {
                    fail(
                        Exit::NotFound,
                        format!("cannot read --data-file `{}`: {e}", path.display()),
                    )
                })?
            };
            Some(parse_data(&text, "--data-file")?)
        }
        (None, None) => None,
    };
    let event_type = full_type(&args.event_type);
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let traceparent = match &args.trace {
        Some(trace) => format!("00-{trace}-{}-01", TraceParent::mint().parent_id_hex()),
        None => TraceParent::mint().to_string(),
    };
    let trace_id = traceparent.split('-').nth(1).unwrap_or_default().to_owned();
    let mut builder = EventBuilderV10::new()
        .id(id.as_str())
        .source(format!("/agents/{agent}"))
        .ty(event_type.as_str())
        .time(chrono::Utc::now())
        .extension(ext::TRACEPARENT, traceparent.as_str());
    if let Some(target) = &args.target {
        builder = builder.extension(ext::TARGET, target.as_str());
    }
    if let Some(subject) = &args.subject {
        builder = builder.subject(subject.as_str());
    }
    if let Some(cause) = &args.causation {
        builder = builder.extension(ext::CAUSATIONID, cause.as_str());
    }
    if let Some(cause_agent) = &args.causation_agent {
        builder = builder.extension(ext::CAUSATIONSOURCE, format!("/agents/{cause_agent}"));
    }
    if let Some(data) = data {
        builder = builder.data("application/json", data);
    }
    let event = builder
        .build()
        .map_err(|e| fail(Exit::Usage, format!("the event does not build: {e}")))?;
    let (mut headers, payload) = schemas::encode_binary(&event);
    headers.insert(
        "Nats-Msg-Id",
        schemas::subjects::event_key(agent, &id).as_str(),
    );
    let subject = schemas::subjects::ingress(agent, &step_token(&event_type));

    let seed = seed_of(home, agent, args.nkey_file.as_deref())?;
    let client = connect_as_agent(endpoints, agent, seed.as_deref()).await?;
    let js = jetstream::new(client.clone());
    let mut receipts = if args.no_wait {
        None
    } else {
        Some(Receipts::open(endpoints, &client, agent, seed.is_none()).await?)
    };
    let ack = publish(&js, &subject, headers, payload).await?;

    if args.no_wait {
        if args.output.json() {
            print_json(&Published {
                event_id: &id,
                trace_id: &trace_id,
                subject: &subject,
                stream: &ack.stream,
                sequence: ack.sequence,
            })?;
        } else {
            outln!(
                "published {event_type} `{id}` as {agent} on {subject} (trace {trace_id}, {} #{})",
                ack.stream,
                ack.sequence
            );
        }
        return Ok(Exit::Ok);
    }
    if !args.output.json() {
        outln!("published {event_type} `{id}` as {agent} on {subject} (trace {trace_id})");
    }
    let Some(receipts) = receipts.as_mut() else {
        return Ok(Exit::Ok);
    };
    let receipt = match tokio::time::timeout(args.wait, receipts.receipt_of(&id)).await {
        Ok(Ok(Some(receipt))) => receipt,
        Ok(Ok(None)) => anyhow::bail!("the receipts stream ended before event `{id}`'s receipt"),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(fail(
                Exit::TimedOut,
                format!(
                    "no receipt for event `{id}` within {}: is a policy worker running (`meshctl status`)? The event waits in MESH_INGRESS and is decided when one runs",
                    crate::output::format_duration(args.wait)
                ),
            ));
        }
    };
    if args.output.json() {
        print_json(&receipt)?;
    } else {
        print_receipt(&receipt);
    }
    Ok(match receipt.decision {
        schemas::Decision::Allow => Exit::Ok,
        _ => Exit::Findings,
    })
}

fn parse_data(text: &str, flag: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| {
        fail(
            Exit::Usage,
            format!(
                "{flag} is not JSON ({e}): write JSON, e.g. '{{\"text\":\"hello\"}}', or a string as '\"hello\"'"
            ),
        )
    })
}

async fn publish(
    js: &jetstream::Context,
    subject: &str,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    // A publish that fails or times out is sent again with the same
    // `Nats-Msg-Id` (docs/contract.md): a no-op if the first was stored.
    let mut last = None;
    for _ in 0..3 {
        let sent = js
            .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
            .await;
        let acked = match sent {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => return Ok(ack),
            Err(e)
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                    || e.kind() == jetstream::context::PublishErrorKind::BrokenPipe =>
            {
                return Err(fail(
                    Exit::NotFound,
                    format!(
                        "no stream takes `{subject}` ({e}): start the stack (`meshctl up`), which creates MESH_INGRESS"
                    ),
                ));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => fail(
            Exit::TimedOut,
            format!(
                "MESH_INGRESS did not acknowledge `{subject}` ({e}): check the stack with `meshctl status`"
            ),
        ),
        None => anyhow::anyhow!("publishing on `{subject}` failed"),
    })
}

/// The receipt as lines for a person.
fn print_receipt(r: &DecisionReceipt) {
    let mut decision = format!("{:<8}", r.decision.as_str());
    if !r.reasons.is_empty() {
        decision.push_str(&format!("by {}", r.reasons.join(", ")));
    }
    outln!("decision  {}", decision.trim_end());
    if !r.errors.is_empty() {
        outln!("errors    {}", r.errors.join("; "));
    }
    if let (schemas::Decision::Allow, Some(target)) = (r.decision, &r.target) {
        outln!(
            "routed    to {target} on {}",
            schemas::subjects::deliver(target, &r.agent)
        );
    }
    if !r.findings.is_empty() {
        outln!("findings  {}", r.findings.join(", "));
    }
    outln!("trace     {}  (`meshctl trace {}`)", r.trace_id, r.trace_id);
    outln!(
        "decided   {} by policy set {}",
        r.decided_at,
        short(&r.policy_hash)
    );
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_get_the_prefix_and_anything_else_stays() {
        assert_eq!(full_type("prompt"), "io.agentmesh.prompt");
        assert_eq!(full_type("tool.call"), "io.agentmesh.tool.call");
        assert_eq!(full_type("io.agentmesh.output"), "io.agentmesh.output");
        assert_eq!(full_type("com.example.thing"), "com.example.thing");
        assert_eq!(full_type("bogus"), "io.agentmesh.bogus");
        assert_eq!(step_token("io.agentmesh.tool.call"), "tool_call");
        assert_eq!(step_token("com.example/x"), "com_example_x");
    }

    #[test]
    fn agents_and_traces_are_checked_at_parse_time() {
        assert!(parse_agent("planner").is_ok());
        assert!(parse_agent("Planner").is_err());
        assert!(parse_agent("a.b").is_err());
        assert_eq!(
            parse_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736").as_deref(),
            Ok("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(parse_trace_id("xyz").is_err());
        assert!(parse_trace_id(&"0".repeat(32)).is_err());
    }
}

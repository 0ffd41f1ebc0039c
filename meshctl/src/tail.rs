//! `meshctl tail receipts|deliveries|dead`: follows `MESH_DECISION`,
//! `MESH_DELIVER` or `MESH_DEAD` live through an ordered consumer of its
//! own (ephemeral: no agent's durable is read or acknowledged), filtered by
//! agent on the subject and by decision and trace on what each message
//! carries.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use schemas::{DecisionReceipt, headers, subjects};
use serde::Serialize;

use crate::exit::{Exit, fail};
use crate::output::{OutputArg, parse_duration, print_json_line};
use crate::publish::{parse_agent, parse_trace_id};
use crate::servers::Endpoints;

/// What to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Feed {
    /// Decision receipts (`MESH_DECISION`, `mesh.decision.<agent>`).
    Receipts,
    /// Allowed, routed events (`MESH_DELIVER`, `mesh.deliver.<target>.<source>`).
    Deliveries,
    /// Denied and invalid events (`MESH_DEAD`, `mesh.dead.<source>`).
    Dead,
}

impl Feed {
    fn stream(self) -> &'static str {
        match self {
            Feed::Receipts => subjects::STREAM_DECISION,
            Feed::Deliveries => subjects::STREAM_DELIVER,
            Feed::Dead => subjects::STREAM_DEAD,
        }
    }

    /// The subject filter for `agent`, where one subject says it (a
    /// delivery matches the agent as target or as source: filtered here,
    /// on its subject's two tokens).
    fn filter(self, agent: Option<&str>) -> String {
        match (self, agent) {
            (Feed::Receipts, Some(a)) => subjects::decision(a),
            (Feed::Dead, Some(a)) => subjects::dead(a),
            (Feed::Deliveries, _) | (_, None) => String::new(),
        }
    }
}

/// A decision, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DecisionFilter {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
    /// Invalid.
    Invalid,
}

impl DecisionFilter {
    fn as_str(self) -> &'static str {
        match self {
            DecisionFilter::Allow => "allow",
            DecisionFilter::Deny => "deny",
            DecisionFilter::Invalid => "invalid",
        }
    }
}

/// `meshctl tail`'s flags.
#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    /// What to follow.
    #[arg(value_enum)]
    feed: Feed,
    /// Only this agent's: receipts and dead letters of its events, deliveries to or from it.
    #[arg(long, value_parser = parse_agent)]
    agent: Option<String>,
    /// Only this decision (repeatable).
    #[arg(long, value_enum)]
    decision: Vec<DecisionFilter>,
    /// Only this workflow (trace id, 32 hex characters).
    #[arg(long, value_parser = parse_trace_id)]
    trace: Option<String>,
    /// Start this far back (e.g. `30s`, `5m`, `2h`) instead of with what comes next.
    #[arg(long, value_parser = parse_duration, conflicts_with = "last")]
    since: Option<Duration>,
    /// Start with the stream's last N messages (counted before any filter) instead of with what comes next.
    #[arg(long, value_name = "N")]
    last: Option<u64>,
    /// Stop after printing this many.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this long (e.g. `30s`); default: until Ctrl-C.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    #[command(flatten)]
    output: OutputArg,
}

/// One line of `tail -o json`.
#[derive(Debug, Serialize)]
struct Entry {
    /// `receipts`, `deliveries` or `dead`.
    feed: &'static str,
    stream: &'static str,
    sequence: u64,
    subject: String,
    /// When the stream stored it (RFC 3339).
    time: String,
    decision: String,
    trace_id: String,
    agent: String,
    event_id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The receipt (receipts only).
    #[serde(skip_serializing_if = "Option::is_none")]
    receipt: Option<DecisionReceipt>,
    /// The `Mesh-*` headers (deliveries and dead letters).
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<std::collections::BTreeMap<String, String>>,
    /// The event's data: JSON as JSON, anything else as a string
    /// (deliveries and dead letters).
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

/// `meshctl tail`.
pub(crate) async fn run(
    home: &crate::procs::Home,
    endpoints: &Endpoints,
    args: TailArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Exit> {
    // On a stack with authorization the registry knows every agent: a
    // misspelt one is named, not followed in silence.
    if let Some(agent) = &args.agent
        && crate::stack::auth_mode(home)
        && !crate::identity::AuthState::new(home)
            .agents()?
            .iter()
            .any(|e| e.name == *agent)
    {
        return Err(fail(
            Exit::NotFound,
            format!(
                "no agent `{agent}` is registered (`meshctl agents list` shows who is; `meshctl agents add {agent} --role <role>` registers it)"
            ),
        ));
    }
    let client = endpoints.connect_nats().await?;
    let js = jetstream::new(client);
    let stream_name = args.feed.stream();
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                fail(
                    Exit::NotFound,
                    format!(
                        "no stream {stream_name}: start the stack (`meshctl up`), which creates it"
                    ),
                )
            }
            _ => anyhow::Error::new(e).context(format!("reading stream {stream_name}")),
        })?;
    let deliver_policy = match (args.since, args.last) {
        (Some(since), _) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::now_utc() - since,
        },
        (None, Some(n)) => {
            let last = stream.info().await?.state.last_sequence;
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last.saturating_sub(n).saturating_add(1).max(1),
            }
        }
        (None, None) => consumer::DeliverPolicy::New,
    };
    let config = consumer::pull::OrderedConfig {
        filter_subject: args.feed.filter(args.agent.as_deref()),
        deliver_policy,
        ..Default::default()
    };
    let mut messages = stream
        .create_consumer(config)
        .await
        .with_context(|| format!("following {stream_name}"))?
        .messages()
        .await?;
    errln!(
        "following {stream_name}{} (Ctrl-C to stop)",
        args.agent
            .as_deref()
            .map(|a| format!(" for agent `{a}`"))
            .unwrap_or_default()
    );
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut printed = 0u64;
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
        let next = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, messages.next()).await.ok(),
                None => Some(messages.next().await),
            }
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = next => m,
        };
        let Some(Some(message)) = message else { break };
        let message = message.map_err(|e| anyhow::anyhow!("reading {stream_name}: {e}"))?;
        if let (Feed::Deliveries, Some(agent)) = (args.feed, &args.agent)
            && !subjects::parse_routed(&message.subject)
                .is_some_and(|r| r.target == agent || r.source == agent)
        {
            continue;
        }
        let Some(entry) = entry_of(args.feed, &message) else {
            continue;
        };
        if !args.decision.is_empty() && !args.decision.iter().any(|d| d.as_str() == entry.decision)
        {
            continue;
        }
        if args.trace.as_ref().is_some_and(|t| *t != entry.trace_id) {
            continue;
        }
        if args.output.json() {
            print_json_line(&entry)?;
        } else {
            outln!("{}", text_line(&entry));
        }
        printed += 1;
    }
    Ok(Exit::Ok)
}

fn entry_of(feed: Feed, message: &jetstream::Message) -> Option<Entry> {
    let info = message.info().ok()?;
    let time = info
        .published
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let (sequence, subject) = (info.stream_sequence, message.subject.to_string());
    let feed_name = match feed {
        Feed::Receipts => "receipts",
        Feed::Deliveries => "deliveries",
        Feed::Dead => "dead",
    };
    if feed == Feed::Receipts {
        let receipt: DecisionReceipt = serde_json::from_slice(&message.payload).ok()?;
        return Some(Entry {
            feed: feed_name,
            stream: feed.stream(),
            sequence,
            subject,
            time,
            decision: receipt.decision.as_str().to_owned(),
            trace_id: receipt.trace_id.clone(),
            agent: receipt.agent.clone(),
            event_id: receipt.event_id.clone(),
            event_type: receipt.event_type.clone(),
            target: receipt.target.clone(),
            reason: None,
            receipt: Some(receipt),
            headers: None,
            data: None,
        });
    }
    let mesh: std::collections::BTreeMap<String, String> = message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .filter(|(name, _)| headers::is_mesh(name.as_ref()))
        .filter_map(|(name, values)| Some((name.to_string(), values.first()?.as_str().to_owned())))
        .collect();
    let header = |name: &str| mesh.get(name).cloned().unwrap_or_default();
    let event = schemas::decode(message.headers.as_ref(), &message.payload)
        .ok()
        .map(|(e, _)| e);
    use schemas::AttributesReader as _;
    let (event_id, event_type, agent, target) = match &event {
        Some(e) => (
            e.id().to_owned(),
            e.ty().to_owned(),
            schemas::AgentId::from_source(e.source().as_str())
                .map(|a| a.to_string())
                .unwrap_or_default(),
            e.extension(schemas::ext::TARGET).map(|t| t.to_string()),
        ),
        None => Default::default(),
    };
    let agent = if agent.is_empty() {
        subject.rsplit('.').next().unwrap_or_default().to_owned()
    } else {
        agent
    };
    let data = match event.as_ref().and_then(|e| e.data()) {
        Some(schemas::Data::Json(v)) => Some(v.clone()),
        Some(schemas::Data::String(s)) => Some(serde_json::Value::String(s.clone())),
        Some(schemas::Data::Binary(b)) => Some(
            serde_json::from_slice(b)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(b).into())),
        ),
        None if !message.payload.is_empty() => Some(serde_json::Value::String(
            String::from_utf8_lossy(&message.payload).into(),
        )),
        None => None,
    };
    let reason = mesh
        .get(headers::REASON)
        .map(|r| schemas::percent_decode_header(headers::REASON, r).unwrap_or_else(|_| r.clone()));
    Some(Entry {
        feed: feed_name,
        stream: feed.stream(),
        sequence,
        subject,
        time,
        decision: header(headers::DECISION),
        trace_id: header(headers::TRACE_ID),
        agent,
        event_id,
        event_type,
        target,
        reason,
        receipt: None,
        headers: Some(mesh),
        data,
    })
}

fn text_line(e: &Entry) -> String {
    let short_type = e
        .event_type
        .strip_prefix(schemas::TYPE_PREFIX)
        .unwrap_or(&e.event_type);
    let mut line = format!(
        "{}  {:<7}  {:<10} {}",
        e.time, e.decision, e.agent, short_type
    );
    if let Some(target) = &e.target {
        line.push_str(&format!(" → {target}"));
    }
    line.push_str(&format!("  event {}  trace {}", e.event_id, e.trace_id));
    if let Some(r) = &e.receipt {
        if !r.reasons.is_empty() {
            line.push_str(&format!("  by {}", r.reasons.join(", ")));
        }
        if !r.errors.is_empty() {
            line.push_str(&format!("  errors: {}", r.errors.join("; ")));
        }
    }
    if let Some(reason) = &e.reason {
        line.push_str(&format!("  reason: {reason}"));
    }
    line
}

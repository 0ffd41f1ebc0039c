//! `meshctl approvals`: the events parked for a human (a permit annotated
//! `@approval("required")` allowed them) — list them, show one with its
//! data, approve or reject it. Answers go to the policy worker as messages
//! on `mesh.approval.answer.<agent>.<id>`; the worker releases or denies the
//! event and records the approver in its receipt (and so in the audit
//! tables). An id may be given by any unique prefix.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use futures::TryStreamExt;
use schemas::{Answer, AnswerAction, ApprovalState, ApprovalStatus, subjects};

use crate::servers::Endpoints;

/// `meshctl approvals ...`
#[derive(Debug, Subcommand)]
pub(crate) enum ApprovalsCommand {
    /// List approval requests: pending ones, or all with --all.
    List {
        /// Also list approved, rejected and expired requests.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Show one request and the parked event's data.
    Show {
        /// The approval id (or a unique prefix).
        id: String,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Release a parked event: it is delivered, and its receipt names the approver.
    Approve(AnswerArgs),
    /// Reject a parked event: it is denied and dead-lettered.
    Reject(AnswerArgs),
}

/// What `approve` and `reject` take.
#[derive(Debug, clap::Args)]
pub(crate) struct AnswerArgs {
    /// The approval id (or a unique prefix).
    id: String,
    /// Who answers, recorded in the receipt and the audit (default: $USER).
    #[arg(long, env = "AGENTMESH_APPROVER")]
    approver: Option<String>,
    /// Why.
    #[arg(long, default_value = "")]
    comment: String,
    /// How long to wait for the policy worker to apply the answer (e.g. `30s`).
    #[arg(long, alias = "timeout-secs", default_value = "30s", value_parser = crate::output::parse_duration)]
    timeout: Duration,
}

/// Runs a `meshctl approvals` command; `Ok(false)` means exit status 1.
pub(crate) async fn run(command: ApprovalsCommand, endpoints: &Endpoints) -> anyhow::Result<bool> {
    let client = endpoints.connect_nats().await?;
    let js = jetstream::new(client);
    let store = js
        .get_key_value(subjects::BUCKET_APPROVALS)
        .await
        .with_context(|| {
            format!(
                "KV bucket `{}` (has a policy worker or `meshctl up` created the streams?)",
                subjects::BUCKET_APPROVALS
            )
        })?;
    match command {
        ApprovalsCommand::List { all, output } => {
            let mut states = all_states(&store).await?;
            states.retain(|(_, s)| all || s.status == ApprovalStatus::Pending);
            states.sort_by(|a, b| a.1.requested_at.cmp(&b.1.requested_at));
            if output.json() {
                let states: Vec<&ApprovalState> = states.iter().map(|(_, s)| s).collect();
                crate::output::print_json(&states)?;
                return Ok(true);
            }
            out!("{}", render_list(&states, Utc::now()));
            Ok(true)
        }
        ApprovalsCommand::Show { id, output } => {
            let (_, state) = resolve(&store, &id).await?;
            if output.json() {
                let data = js
                    .get_stream(subjects::STREAM_APPROVALS)
                    .await?
                    .get_last_raw_message_by_subject(&state.request_subject)
                    .await
                    .ok()
                    .and_then(|m| schemas::decode(Some(&m.headers), &m.payload).ok())
                    .and_then(|(event, _)| match event.data() {
                        Some(schemas::Data::Json(v)) => Some(v.clone()),
                        Some(schemas::Data::String(s)) => {
                            Some(serde_json::Value::String(s.clone()))
                        }
                        Some(schemas::Data::Binary(b)) => {
                            serde_json::from_slice(b).ok().or_else(|| {
                                Some(serde_json::Value::String(
                                    String::from_utf8_lossy(b).into_owned(),
                                ))
                            })
                        }
                        None => None,
                    });
                let mut value = serde_json::to_value(&state)?;
                if let Some(object) = value.as_object_mut() {
                    object.insert("data".into(), data.unwrap_or(serde_json::Value::Null));
                }
                crate::output::print_json(&value)?;
                return Ok(true);
            }
            outln!("approval  {}", state.id);
            outln!("status    {}", state.status);
            outln!("event     {} ({})", state.receipt.event_id, what(&state));
            outln!("trace     {}", state.receipt.trace_id);
            outln!("policies  {}", state.receipt.reasons.join(", "));
            if !state.receipt.findings.is_empty() {
                outln!("findings  {}", state.receipt.findings.join(", "));
            }
            outln!("requested {}", state.requested_at);
            outln!("expires   {}", state.expires_at);
            if state.status != ApprovalStatus::Pending {
                outln!("answered  {} {}", state.answered_at, state.approver);
                if !state.comment.is_empty() {
                    outln!("comment   {}", state.comment);
                }
            }
            let request = js
                .get_stream(subjects::STREAM_APPROVALS)
                .await?
                .get_last_raw_message_by_subject(&state.request_subject)
                .await;
            match request {
                Ok(m) => {
                    let (event, _) = schemas::decode(Some(&m.headers), &m.payload)
                        .context("the parked event does not decode")?;
                    let data = match event.data() {
                        Some(schemas::Data::Json(v)) => {
                            serde_json::to_string_pretty(v).unwrap_or_default()
                        }
                        Some(schemas::Data::String(s)) => s.clone(),
                        Some(schemas::Data::Binary(b)) => {
                            match serde_json::from_slice::<serde_json::Value>(b) {
                                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                                Err(_) => String::from_utf8_lossy(b).into_owned(),
                            }
                        }
                        None => "(no data)".into(),
                    };
                    outln!("data\n{data}");
                }
                Err(e) => outln!("data      (no longer stored: {e})"),
            }
            Ok(true)
        }
        ApprovalsCommand::Approve(args) => answer(&js, &store, AnswerAction::Approve, args).await,
        ApprovalsCommand::Reject(args) => answer(&js, &store, AnswerAction::Reject, args).await,
    }
}

/// Every request in the bucket, with its revision.
async fn all_states(store: &kv::Store) -> anyhow::Result<Vec<(u64, ApprovalState)>> {
    // A key updated while listing is listed twice: a set keeps one.
    let keys: std::collections::BTreeSet<String> = store
        .keys()
        .await
        .context("listing approval requests")?
        .try_collect()
        .await
        .context("listing approval requests")?;
    let mut out = Vec::new();
    for key in keys {
        if let Some(state) = state(store, &key).await? {
            out.push(state);
        }
    }
    Ok(out)
}

/// The request stored under `id`, with its revision.
async fn state(store: &kv::Store, id: &str) -> anyhow::Result<Option<(u64, ApprovalState)>> {
    Ok(match store.entry(id).await? {
        Some(entry) if entry.operation == kv::Operation::Put => {
            serde_json::from_slice::<ApprovalState>(&entry.value)
                .ok()
                .map(|s| (entry.revision, s))
        }
        _ => None,
    })
}

/// The request whose id starts with `prefix`.
async fn resolve(store: &kv::Store, prefix: &str) -> anyhow::Result<(u64, ApprovalState)> {
    let prefix = prefix.trim().to_ascii_lowercase();
    if prefix.len() < 4 {
        bail!("give at least 4 characters of the approval id");
    }
    let mut matches: Vec<(u64, ApprovalState)> = all_states(store)
        .await?
        .into_iter()
        .filter(|(_, s)| s.id.starts_with(&prefix))
        .collect();
    match matches.len() {
        0 => bail!("no approval request `{prefix}` (see `meshctl approvals list --all`)"),
        1 => Ok(matches.remove(0)),
        n => bail!("`{prefix}` matches {n} approval requests: give more of the id"),
    }
}

fn short_type(ty: &str) -> &str {
    ty.strip_prefix(schemas::TYPE_PREFIX).unwrap_or(ty)
}

/// `coder tool.call deploy.prod` / `planner task.handoff → reviewer`.
fn what(state: &ApprovalState) -> String {
    let r = &state.receipt;
    let mut s = format!("{} {}", state.agent, short_type(&r.event_type));
    if let Some(subject) = r
        .subject
        .as_deref()
        .filter(|_| r.event_type.ends_with("tool.call"))
    {
        s.push(' ');
        s.push_str(subject);
    }
    if let Some(target) = &r.target {
        s.push_str(" → ");
        s.push_str(target);
    }
    s
}

fn ago(then: &str, now: DateTime<Utc>) -> String {
    match DateTime::parse_from_rfc3339(then) {
        Ok(t) => {
            let secs = (now - t.with_timezone(&Utc)).num_seconds();
            if secs >= 0 {
                format!("{} ago", human(secs))
            } else {
                format!("in {}", human(-secs))
            }
        }
        Err(_) => then.to_owned(),
    }
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The table `meshctl approvals list` prints.
fn render_list(states: &[(u64, ApprovalState)], now: DateTime<Utc>) -> String {
    if states.is_empty() {
        return "No approval requests.\n".into();
    }
    let mut out = format!(
        "{:<12}  {:<8}  {:<40}  {:<10}  {:<12}  {}\n",
        "ID", "STATUS", "EVENT", "REQUESTED", "EXPIRES", "POLICIES / ANSWER"
    );
    for (_, s) in states {
        let expires = if s.status == ApprovalStatus::Pending {
            ago(&s.expires_at, now)
        } else {
            "-".into()
        };
        let last = if s.status == ApprovalStatus::Pending {
            s.receipt.reasons.join(",")
        } else if s.approver.is_empty() {
            s.comment.clone()
        } else {
            format!("{} by {}", s.status, s.approver)
        };
        out.push_str(&format!(
            "{:<12}  {:<8}  {:<40}  {:<10}  {:<12}  {}\n",
            &s.id[..12.min(s.id.len())],
            s.status,
            what(s),
            ago(&s.requested_at, now),
            expires,
            last
        ));
    }
    out
}

async fn answer(
    js: &jetstream::Context,
    store: &kv::Store,
    action: AnswerAction,
    args: AnswerArgs,
) -> anyhow::Result<bool> {
    let approver = args
        .approver
        .or_else(|| std::env::var("USER").ok())
        .filter(|a| !a.trim().is_empty())
        .context("name the approver with --approver NAME (or AGENTMESH_APPROVER)")?;
    let (_, state) = resolve(store, &args.id).await?;
    if state.status != ApprovalStatus::Pending {
        errln!(
            "meshctl: approval {} is already {} ({}{})",
            state.id,
            state.status,
            state.answered_at,
            if state.approver.is_empty() {
                String::new()
            } else {
                format!(" by {}", state.approver)
            }
        );
        return Ok(false);
    }
    broker_config::admin::send_answer(
        js,
        &state.agent,
        &Answer {
            id: state.id.clone(),
            action,
            approver: approver.clone(),
            comment: args.comment,
            at: Utc::now().to_rfc3339(),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("sending the answer: {e}"))?;
    let wanted = match action {
        AnswerAction::Approve => ApprovalStatus::Approved,
        _ => ApprovalStatus::Rejected,
    };
    let outcome = outcome(store, &state.id, args.timeout).await?;
    outln!("{}", outcome_line(&outcome, wanted));
    Ok(outcome.status == wanted)
}

/// Waits until a policy worker has applied the answer to approval `id`
/// (its state is no longer pending), for at most `timeout`.
async fn outcome(store: &kv::Store, id: &str, timeout: Duration) -> anyhow::Result<ApprovalState> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, now) = self::state(store, id)
            .await?
            .context("the approval request disappeared")?;
        if now.status != ApprovalStatus::Pending {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            bail!(
                "the answer is stored, but no policy worker applied it within {}s: is one running (`meshctl status`)? It applies the answer when it starts",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `meshctl approvals approve|reject` prints once the answer is applied.
fn outcome_line(now: &ApprovalState, wanted: ApprovalStatus) -> String {
    let verb = match now.status {
        ApprovalStatus::Approved => "released",
        _ => "denied",
    };
    format!(
        "{} {}: {} {verb} ({}{}).",
        now.status,
        &now.id[..12.min(now.id.len())],
        what(now),
        if now.approver.is_empty() {
            now.comment.clone()
        } else {
            format!("by {}", now.approver)
        },
        if now.status == wanted {
            ""
        } else {
            "; not what was asked"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_rendering() {
        let now = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let state = ApprovalState {
            id: "0123456789abcdef0123456789abcdef".into(),
            status: ApprovalStatus::Pending,
            agent: "coder".into(),
            request_subject: "mesh.approval.request.coder.x".into(),
            requested_at: "2026-03-01T11:58:00Z".into(),
            expires_at: "2026-03-01T12:58:00Z".into(),
            approver: String::new(),
            comment: String::new(),
            answered_at: String::new(),
            decision_span: String::new(),
            receipt: schemas::DecisionReceipt {
                event_type: "io.agentmesh.tool.call".into(),
                subject: Some("deploy.prod".into()),
                reasons: vec!["deploys-need-approval".into()],
                ..Default::default()
            },
        };
        let text = render_list(&[(1, state)], now);
        let line = text.lines().nth(1).unwrap();
        assert!(
            line.starts_with("0123456789ab  pending   coder tool.call deploy.prod"),
            "{line}"
        );
        assert!(
            line.contains("120s ago") || line.contains("2m ago"),
            "{line}"
        );
        assert!(line.contains("in 58m"), "{line}");
        assert!(line.ends_with("deploys-need-approval"), "{line}");
        assert_eq!(render_list(&[], now), "No approval requests.\n");
    }
}

//! What the web UI reads from the audit tables: the decision tree through
//! [`tree::fetch`] (the shipped `decision_tree.sql`), denials through the
//! shipped `denials.sql`, and two queries of its own — the list of recent
//! traces and each step's data and receipt. Every value a user typed is
//! bound with [`audit_tables::queries::render`]; all of it runs on ClickHouse
//! 18.16 and current servers (`FINAL` reads, no JSON functions).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::PageError;
use super::filter::{DecisionFilter, TraceFilter, Window};
use crate::tree::{self, Node};

/// How long one page may wait for ClickHouse.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Recent traces: one row per trace with a step in the window. The agent and
/// decision filters apply to the whole trace (`has(agents, …)`, counts), so
/// a filtered trace keeps all of its figures. `{conditions}` is one of the
/// fixed strings of [`conditions`], never user input.
const TRACES_SQL: &str = "\
SELECT trace_id, agents, steps, first_us, last_us, decided, allowed, denied, invalid
FROM
(
    SELECT trace_id, groupUniqArray(agent) AS agents, count() AS steps,
        min(time_us) AS first_us, max(time_us) AS last_us
    FROM events FINAL
    WHERE time >= {from:DateTime} AND time < {to:DateTime}
    GROUP BY trace_id
) AS e
ANY LEFT JOIN
(
    SELECT trace_id, count() AS decided, countIf(decision = 'allow') AS allowed,
        countIf(decision = 'deny') AS denied, countIf(decision = 'invalid') AS invalid
    FROM decisions FINAL
    WHERE trace_id IN
        (SELECT trace_id FROM events WHERE time >= {from:DateTime} AND time < {to:DateTime})
    GROUP BY trace_id
) AS d USING trace_id
WHERE {conditions}
ORDER BY last_us DESC, trace_id
LIMIT {limit:UInt32}";

/// Each step's payload, for the trace page.
const EVENT_DATA_SQL: &str = "\
SELECT agent, event_id, datacontenttype, data, data_encoding, ingress_subject
FROM events FINAL
WHERE trace_id = {trace_id:String}";

/// Each step's receipt with its shadow and approval columns.
const RECEIPTS_SQL: &str = "\
SELECT agent, event_id, receipt, shadow_decision, shadow_reasons, shadow_policy_hash,
    approval_status, approver, approval_comment
FROM decisions FINAL
WHERE trace_id = {trace_id:String}";

/// One row of the trace list.
#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub(super) struct TraceRow {
    /// The workflow.
    pub trace_id: String,
    /// The agents that published its steps (unordered).
    pub agents: Vec<String>,
    /// Its steps in the window.
    pub steps: u64,
    /// Its first step, µs since the epoch.
    pub first_us: u64,
    /// Its last step, µs since the epoch.
    pub last_us: u64,
    /// Steps with a receipt.
    pub decided: u64,
    /// Allowed steps.
    pub allowed: u64,
    /// Denied steps.
    pub denied: u64,
    /// Invalid steps.
    pub invalid: u64,
}

/// A step's payload as the audit sink stored it.
#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub(super) struct EventData {
    /// The publishing agent.
    pub agent: String,
    /// The event id.
    pub event_id: String,
    /// As sent.
    pub datacontenttype: String,
    /// The data, whole (`hex` when not UTF-8).
    pub data: String,
    /// `utf8` or `hex`.
    pub data_encoding: String,
    /// Where the event arrived.
    pub ingress_subject: String,
}

/// A step's receipt and what the shadow set and an approver said.
#[derive(Debug, Clone, Default, Deserialize, clickhouse::Row)]
pub(super) struct Receipt {
    /// The decided event's agent.
    pub agent: String,
    /// The decided event's id.
    pub event_id: String,
    /// The receipt JSON as received.
    pub receipt: String,
    /// The shadow set's decision, `''` without a shadow set.
    pub shadow_decision: String,
    /// Its determining policies.
    pub shadow_reasons: Vec<String>,
    /// The shadow set's hash.
    pub shadow_policy_hash: String,
    /// `approved`, `rejected`, `expired` or `''`.
    pub approval_status: String,
    /// Who answered.
    pub approver: String,
    /// Their comment.
    pub approval_comment: String,
}

/// A trace with what the page shows beside its tree, keyed by agent and
/// event id (the identity of an event).
#[derive(Debug, Default)]
pub(super) struct Trace {
    /// The steps, oldest first, as `decision_tree.sql` returns them.
    pub nodes: Vec<Node>,
    /// Payloads by (agent, event id).
    pub data: HashMap<(String, String), EventData>,
    /// Receipts by (agent, event id).
    pub receipts: HashMap<(String, String), Receipt>,
}

/// One denial, as `denials.sql` returns it.
#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub(super) struct DenialRow {
    /// The denied agent.
    pub agent: String,
    /// The determining policy (`(evaluation error)` without one).
    pub policy: String,
    /// When it was decided, seconds.
    pub time: u32,
    /// The denied event.
    pub event_id: String,
    /// Its workflow.
    pub trace_id: String,
    /// Its type.
    pub r#type: String,
    /// Its target.
    pub target: String,
    /// Its subject (the tool of a tool call).
    pub subject: String,
    /// Evaluation errors.
    pub errors: Vec<String>,
}

/// Reads the audit database for the pages.
#[derive(Clone)]
pub(super) struct Audit {
    client: clickhouse::Client,
    /// Where, for messages.
    url: String,
}

impl Audit {
    /// Reads through `client` (in the audit database) at `url`.
    pub(super) fn new(client: clickhouse::Client, url: String) -> Self {
        Self { client, url }
    }

    /// The traces `filter` selects, most recent first.
    pub(super) async fn traces(&self, filter: &TraceFilter) -> Result<Vec<TraceRow>, PageError> {
        let mut params = window_params(&filter.window);
        params.insert("limit".into(), filter.limit.to_string());
        if let Some(agent) = &filter.agent {
            params.insert("agent".into(), agent.clone());
        }
        let sql = TRACES_SQL.replace("{conditions}", &conditions(filter));
        let sql =
            audit_tables::queries::render(&sql, &params).context("rendering the trace list")?;
        let query = self.client.query_raw(&sql).fetch_all::<TraceRow>();
        self.wait(query, "reading the trace list").await
    }

    /// The steps of `trace_id` with their data and receipts.
    pub(super) async fn trace(&self, trace_id: &str) -> Result<Trace, PageError> {
        let nodes = self.wait(tree::fetch(&self.client, trace_id), "").await?;
        if nodes.is_empty() {
            return Ok(Trace::default());
        }
        let params = BTreeMap::from([("trace_id".to_owned(), trace_id.to_owned())]);
        let data_sql = audit_tables::queries::render(EVENT_DATA_SQL, &params)
            .context("rendering the step data query")?;
        let receipts_sql = audit_tables::queries::render(RECEIPTS_SQL, &params)
            .context("rendering the receipt query")?;
        let data = self.client.query_raw(&data_sql).fetch_all::<EventData>();
        let data = self.wait(data, "reading the steps' data").await?;
        let receipts = self.client.query_raw(&receipts_sql).fetch_all::<Receipt>();
        let receipts = self.wait(receipts, "reading the receipts").await?;
        Ok(Trace {
            // A call answered from the cache shows its answer, as `meshctl
            // trace` draws it, so the caller's next steps hang under it.
            nodes: tree::with_cached_answers(&nodes),
            data: data
                .into_iter()
                .map(|d| ((d.agent.clone(), d.event_id.clone()), d))
                .collect(),
            receipts: receipts
                .into_iter()
                .map(|r| ((r.agent.clone(), r.event_id.clone()), r))
                .collect(),
        })
    }

    /// Only the steps of `trace_id` (what the live view polls).
    pub(super) async fn steps(&self, trace_id: &str) -> Result<Vec<Node>, PageError> {
        self.wait(tree::fetch(&self.client, trace_id), "").await
    }

    /// The denials in `window`, by agent and policy.
    pub(super) async fn denials(&self, window: &Window) -> Result<Vec<DenialRow>, PageError> {
        let sql = audit_tables::queries::render(
            audit_tables::queries::DENIALS.sql,
            &window_params(window),
        )
        .context("rendering denials.sql")?;
        let query = self.client.query_raw(&sql).fetch_all::<DenialRow>();
        self.wait(query, "reading denials").await
    }

    /// Runs `query` within [`QUERY_TIMEOUT`]; a server that does not answer
    /// is a 503, a query it refuses a 502.
    async fn wait<T, E>(
        &self,
        query: impl Future<Output = Result<T, E>>,
        what: &str,
    ) -> Result<T, PageError>
    where
        E: Into<anyhow::Error>,
    {
        let Ok(result) = tokio::time::timeout(QUERY_TIMEOUT, query).await else {
            return Err(PageError::Unavailable(format!(
                "ClickHouse at {} did not answer within {} s",
                self.url,
                QUERY_TIMEOUT.as_secs()
            )));
        };
        result.map_err(|e| {
            let e: anyhow::Error = e.into();
            let e = if what.is_empty() {
                e
            } else {
                e.context(what.to_owned())
            };
            classify(&self.url, &e)
        })
    }
}

/// The SQL condition for `filter`: fixed strings and placeholders only.
fn conditions(filter: &TraceFilter) -> String {
    let mut parts = vec!["1"];
    if filter.agent.is_some() {
        parts.push("has(agents, {agent:String})");
    }
    parts.push(match filter.decision {
        None => "1",
        Some(DecisionFilter::Allow) => "allowed > 0",
        Some(DecisionFilter::Deny) => "denied > 0",
        Some(DecisionFilter::Invalid) => "invalid > 0",
        Some(DecisionFilter::Pending) => "decided < steps",
    });
    parts.join(" AND ")
}

fn window_params(window: &Window) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "from".to_owned(),
            window.from.timestamp().max(0).to_string(),
        ),
        ("to".to_owned(), window.to.timestamp().max(0).to_string()),
    ])
}

/// A ClickHouse that cannot be reached is a 503; one that answers with an
/// error (a missing table, a refused user) a 502.
fn classify(url: &str, error: &anyhow::Error) -> PageError {
    let unreachable = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<clickhouse::error::Error>(),
            Some(clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut)
        )
    });
    if unreachable {
        PageError::Unavailable(format!("ClickHouse at {url} does not answer: {error:#}"))
    } else {
        PageError::Upstream(format!("ClickHouse at {url} refused the query: {error:#}"))
    }
}

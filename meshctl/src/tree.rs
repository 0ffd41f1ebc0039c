//! A workflow's decision tree, read from ClickHouse with the shipped
//! `decision_tree.sql` and drawn one line per step, indented by causation.
//!
//! A step is identified by its agent and event id (two agents may both use
//! id `1`): a child links to the step `(parent_agent, parent_id)`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

/// One step of the tree: a row of `audit-tables/sql/decision_tree.sql`,
/// declared next to the query.
pub(crate) use audit_tables::queries::TreeNode as Node;

/// How often `meshctl trace --wait` asks ClickHouse again.
const POLL: Duration = Duration::from_millis(250);

/// Checks a trace id: 32 lowercase hex characters.
pub(crate) fn check_trace_id(trace_id: &str) -> anyhow::Result<()> {
    if trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(crate::exit::fail(
            crate::exit::Exit::Usage,
            format!("`{trace_id}` is not a trace id: expected 32 lowercase hex characters"),
        ))
    }
}

/// `meshctl trace <id>`: the decision tree of one workflow, from ClickHouse.
pub(crate) async fn print(
    endpoints: &crate::servers::Endpoints,
    trace_id: &str,
    wait: Duration,
    json: bool,
) -> anyhow::Result<()> {
    check_trace_id(trace_id)?;
    // A trace just published is in ClickHouse once the audit sink has
    // written its batches (steps and decisions apart): poll until every
    // step has its decision, up to `wait`; then draw what is there. A
    // failed query is no reason to wait (ClickHouse down, a bad URL): it
    // fails at once.
    let deadline = Instant::now() + wait;
    let nodes = loop {
        let nodes = fetch(&endpoints.audit_db(), trace_id).await?;
        let complete = !nodes.is_empty() && nodes.iter().all(|n| !n.decision.is_empty());
        if complete || Instant::now() >= deadline {
            break nodes;
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    };
    if nodes.is_empty() {
        return Err(crate::exit::fail(
            crate::exit::Exit::NotFound,
            format!(
                "no steps of trace {trace_id} in `{}.events` after {}: check the id (`meshctl tail receipts --trace {trace_id} --since 1h` shows whether the mesh decided it), or give the audit sink longer (`--wait 1m`; `meshctl status` shows its backlog)",
                endpoints.database,
                crate::output::format_duration(wait),
            ),
        ));
    }
    if json {
        let parents = parents(&nodes);
        let steps: Vec<serde_json::Value> = nodes
            .iter()
            .zip(parents)
            .map(|(n, parent)| {
                serde_json::json!({
                    "event_id": n.event_id,
                    "agent": n.agent,
                    "type": n.r#type,
                    "target": n.target,
                    "subject": n.subject,
                    "time_us": n.time_us,
                    "decision": n.decision,
                    "reasons": n.reasons,
                    "errors": n.errors,
                    "policy_hash": n.policy_hash,
                    "valid": n.valid != 0,
                    "cache": n.cache,
                    "parent": parent,
                })
            })
            .collect();
        return crate::output::print_json(&serde_json::json!({
            "trace_id": trace_id,
            "steps": steps,
        }));
    }
    let reports = reports(&endpoints.audit_db(), trace_id).await?;
    out!("{}", render_with(trace_id, &nodes, &reports));
    Ok(())
}

/// The steps of `trace_id`, oldest first.
pub(crate) async fn fetch(
    client: &clickhouse::Client,
    trace_id: &str,
) -> anyhow::Result<Vec<Node>> {
    let params = BTreeMap::from([("trace_id".to_owned(), trace_id.to_owned())]);
    let sql = audit_tables::queries::render(audit_tables::queries::DECISION_TREE.sql, &params)?;
    client
        .query_raw(&sql)
        .fetch_all::<Node>()
        .await
        .context("reading the decision tree from ClickHouse")
}

/// The CloudEvents `subject` of the observation an SDK agent publishes when
/// it gives up on a delivery (`agents_sdk::payload::GAVE_UP_SUBJECT`).
const GAVE_UP_SUBJECT: &str = "delivery.gave_up";

/// The give-up reports of `trace_id`: the `text` of each `delivery.gave_up`
/// observation's data, keyed `<agent>/<event id>`.
pub(crate) async fn reports(
    client: &clickhouse::Client,
    trace_id: &str,
) -> anyhow::Result<HashMap<String, String>> {
    #[derive(Debug, Deserialize, clickhouse::Row)]
    struct Report {
        agent: String,
        event_id: String,
        data: String,
    }
    #[derive(Debug, Deserialize)]
    struct Text {
        text: String,
    }
    let rows = client
        .query("SELECT agent, event_id, data FROM events FINAL WHERE trace_id = ? AND type = ? AND subject = ?")
        .bind(trace_id)
        .bind(schemas::EventType::Observation.as_str())
        .bind(GAVE_UP_SUBJECT)
        .fetch_all::<Report>()
        .await
        .context("reading the give-up reports from ClickHouse")?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let text = serde_json::from_str::<Text>(&r.data).ok()?.text;
            Some((schemas::subjects::event_key(&r.agent, &r.event_id), text))
        })
        .collect())
}

fn short_type(ty: &str) -> &str {
    ty.strip_prefix(schemas::TYPE_PREFIX).unwrap_or(ty)
}

fn what(node: &Node, reports: &HashMap<String, String>) -> String {
    if let Some(text) = reports.get(&schemas::subjects::event_key(&node.agent, &node.event_id)) {
        // "coder gave up on task.handoff … after 5 attempts: …"
        let text = text
            .strip_prefix(&format!("{} ", node.agent))
            .unwrap_or(text);
        return format!("{:<9} {text}", node.agent);
    }
    let mut s = format!("{:<9} {}", node.agent, short_type(&node.r#type));
    if node.r#type == schemas::EventType::ToolCall.as_str() && !node.subject.is_empty() {
        s.push(' ');
        s.push_str(&node.subject);
    }
    if !node.target.is_empty() {
        s.push_str(" → ");
        s.push_str(&node.target);
    }
    s
}

/// `nodes` with the cached answers drawn in: each call answered from the
/// cache gets a `tool.result` step from the tool's agent (the answer the
/// worker published, which is not an ingress event), under its id, so the
/// caller's steps that follow the answer hang under it.
pub(crate) fn with_cached_answers(nodes: &[Node]) -> Vec<Node> {
    let mut all = nodes.to_vec();
    for call in nodes.iter().filter(|n| n.cache == "hit") {
        all.push(Node {
            event_id: schemas::cache::answer_id(&call.agent, &call.event_id),
            parent_id: call.event_id.clone(),
            agent: call.target.clone(),
            r#type: schemas::EventType::ToolResult.as_str().to_owned(),
            target: call.agent.clone(),
            subject: call.subject.clone(),
            time: call.time,
            time_us: call.time_us,
            decision: CACHED.to_owned(),
            reasons: Vec::new(),
            errors: Vec::new(),
            policy_hash: call.policy_hash.clone(),
            valid: 1,
            error: String::new(),
            parent_agent: call.agent.clone(),
            cache: String::new(),
            cache_source: call.cache_source.clone(),
            labels_added: Vec::new(),
            redacted: Vec::new(),
        });
    }
    all
}

/// The decision column of a cached answer drawn by [`with_cached_answers`].
const CACHED: &str = "cached";

fn cache_note(node: &Node) -> String {
    match node.cache.as_str() {
        "hit" => "  · answered from the cache".to_owned(),
        "stored" => "  · stored in the cache".to_owned(),
        _ => String::new(),
    }
}

fn verdict(node: &Node) -> String {
    if node.decision == CACHED {
        return format!(
            "from the cache, first produced by call {}",
            node.cache_source
        );
    }
    verdict_of(node) + &cache_note(node) + &flow_note(node)
}

/// Where the workflow picked labels up, and what a delivery had redacted.
fn flow_note(node: &Node) -> String {
    let mut note = String::new();
    if !node.labels_added.is_empty() {
        note += &format!("  · labels +{}", node.labels_added.join(" +"));
    }
    if !node.redacted.is_empty() {
        note += &format!("  · redacted {}", node.redacted.join(", "));
    }
    note
}

fn verdict_of(node: &Node) -> String {
    // Cedar reports the determining policies as a set: sort for a stable line.
    let mut reasons = node.reasons.clone();
    reasons.sort();
    let policies = reasons.join(", ");
    match node.decision.as_str() {
        "allow" if policies.is_empty() => "allow".to_owned(),
        "allow" => format!("allow  ({policies})"),
        "deny" if policies.is_empty() => {
            format!("DENY   (fail closed: {})", node.errors.join("; "))
        }
        "deny" => format!("DENY   by {policies}"),
        "invalid" => format!("INVALID ({})", node.errors.join("; ")),
        "" => "…      no decision yet".to_owned(),
        other => other.to_owned(),
    }
}

/// The index of each step's parent in `nodes`, `None` for a root or a
/// parent outside the trace. The parent is the step `(parent_agent,
/// parent_id)`; without a `parent_agent` (rows of an older query), the step
/// with id `parent_id` whose target is this step's agent, else the latest
/// one before this step, else the earliest after it.
pub(crate) fn parents(nodes: &[Node]) -> Vec<Option<usize>> {
    let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        by_id.entry(n.event_id.as_str()).or_default().push(i);
    }
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            if node.parent_id.is_empty() {
                return None;
            }
            let candidates = by_id.get(node.parent_id.as_str())?;
            let parent = if node.parent_agent.is_empty() {
                candidates.iter().copied().max_by_key(|&c| {
                    let c = &nodes[c];
                    let before = c.time_us < node.time_us;
                    let order = if before {
                        i128::from(c.time_us)
                    } else {
                        -i128::from(c.time_us)
                    };
                    (c.target == node.agent, before, order)
                })
            } else {
                candidates
                    .iter()
                    .copied()
                    .find(|&c| nodes[c].agent == node.parent_agent)
            };
            parent.filter(|&p| p != i)
        })
        .collect()
}

/// The causation edges of a trace's steps, as indexes into its `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Links {
    /// Steps without a parent in this trace, oldest first.
    pub roots: Vec<usize>,
    /// Each step's children, oldest first.
    pub children: Vec<Vec<usize>>,
}

/// Links each step to its parent: roots are steps without a parent in this
/// trace; children follow their parent in the order of `nodes`. (Steps of a
/// causation cycle are in no root's subtree: drawers start from them too.)
pub(crate) fn links(nodes: &[Node]) -> Links {
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    let mut roots = Vec::new();
    for (i, parent) in parents(nodes).into_iter().enumerate() {
        match parent {
            Some(p) => children[p].push(i),
            None => roots.push(i),
        }
    }
    Links { roots, children }
}

/// Draws the tree: roots are steps without a parent in this trace; children
/// follow their parent, oldest first; the decision column is aligned.
pub(crate) fn render(trace_id: &str, nodes: &[Node]) -> String {
    render_with(trace_id, nodes, &HashMap::new())
}

/// [`render`], with give-up reports (from [`reports`], keyed `<agent>/<event
/// id>`) drawn as what they say instead of as a plain observation.
pub(crate) fn render_with(
    trace_id: &str,
    nodes: &[Node],
    reports: &HashMap<String, String>,
) -> String {
    let drawn = with_cached_answers(nodes);
    let cached = drawn.len() - nodes.len();
    let nodes = &drawn[..];
    let Links { roots, children } = links(nodes);
    // (left part, verdict) per line, in drawing order.
    let mut lines: Vec<(String, String)> = Vec::with_capacity(nodes.len());
    let mut seen = vec![false; nodes.len()];
    // Depth-first from each root, then from any step a causation cycle left
    // unreached, so every step is drawn exactly once.
    let starts: Vec<usize> = roots.iter().copied().chain(0..nodes.len()).collect();
    for start in starts {
        // (node, prefix for its children, its own branch)
        let mut stack = vec![(start, String::new(), String::new())];
        while let Some((i, prefix, branch)) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            lines.push((
                format!("{branch}{}", what(&nodes[i], reports)),
                verdict(&nodes[i]),
            ));
            let kids = &children[i];
            for (k, &child) in kids.iter().enumerate().rev() {
                let last = k + 1 == kids.len();
                let branch = format!("{prefix}{}", if last { "└─ " } else { "├─ " });
                let next = format!("{prefix}{}", if last { "   " } else { "│  " });
                stack.push((child, next, branch));
            }
        }
    }
    let width = lines
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let denied = nodes.iter().filter(|n| n.decision == "deny").count();
    let undecided = nodes.iter().filter(|n| n.decision.is_empty()).count();
    let steps = nodes.len() - cached;
    let mut out = format!(
        "Decision tree of trace {trace_id}: {steps} step{}, {denied} denied{}{}\n",
        if steps == 1 { "" } else { "s" },
        if undecided > 0 {
            format!(", {undecided} without decision")
        } else {
            String::new()
        },
        if cached > 0 {
            format!(", {cached} answered from the cache")
        } else {
            String::new()
        }
    );
    for (left, verdict) in lines {
        let pad = width - left.chars().count();
        out.push_str(&format!("  {left}{}  {verdict}\n", " ".repeat(pad)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(
        clippy::too_many_arguments,
        reason = "a test fixture that names every column it sets"
    )]
    fn node(
        id: &str,
        parent: &str,
        agent: &str,
        ty: &str,
        target: &str,
        tool: &str,
        decision: &str,
        reasons: &[&str],
    ) -> Node {
        Node {
            event_id: id.into(),
            parent_id: parent.into(),
            agent: agent.into(),
            r#type: format!("io.agentmesh.{ty}"),
            target: target.into(),
            subject: tool.into(),
            time: 0,
            time_us: 0,
            decision: decision.into(),
            reasons: reasons.iter().map(|s| s.to_string()).collect(),
            errors: Vec::new(),
            policy_hash: String::new(),
            valid: 1,
            error: String::new(),
            parent_agent: String::new(),
            cache: String::new(),
            cache_source: String::new(),
            labels_added: Vec::new(),
            redacted: Vec::new(),
        }
    }

    #[test]
    fn draws_by_causation() {
        let nodes = vec![
            node("a", "", "planner", "prompt", "", "", "allow", &["p1"]),
            node(
                "b",
                "a",
                "planner",
                "task.handoff",
                "coder",
                "",
                "allow",
                &[],
            ),
            node(
                "c",
                "b",
                "coder",
                "tool.call",
                "",
                "code.search",
                "allow",
                &[],
            ),
            node(
                "d",
                "b",
                "coder",
                "tool.call",
                "",
                "shell.exec",
                "deny",
                &["forbid-shell-exec"],
            ),
            node("e", "c", "coder", "tool.result", "coder", "", "", &[]),
        ];
        let text = render("t", &nodes);
        let expected = "\
Decision tree of trace t: 5 steps, 1 denied, 1 without decision
  planner   prompt                        allow  (p1)
  └─ planner   task.handoff → coder       allow
     ├─ coder     tool.call code.search   allow
     │  └─ coder     tool.result → coder  …      no decision yet
     └─ coder     tool.call shell.exec    DENY   by forbid-shell-exec
";
        assert_eq!(text, expected);
    }

    #[test]
    fn where_a_workflow_picked_its_labels_up_and_what_was_redacted() {
        let mut read = node(
            "r",
            "",
            "coder",
            "tool.call",
            "",
            "repo.read_secret",
            "allow",
            &["p"],
        );
        read.labels_added = vec!["private".into()];
        let mut fetch = node(
            "f",
            "r",
            "coder",
            "tool.call",
            "",
            "web.fetch",
            "allow",
            &["p"],
        );
        fetch.labels_added = vec!["untrusted".into()];
        let post = node(
            "x",
            "f",
            "coder",
            "tool.call",
            "",
            "http.post",
            "deny",
            &["no-exfil"],
        );
        let mut note = node(
            "m",
            "x",
            "coder",
            "message",
            "reviewer",
            "",
            "allow",
            &["q"],
        );
        note.redacted = vec!["pii.email".into()];
        let text = render("t", &[read, fetch, post, note]);
        assert!(
            text.contains("repo.read_secret") && text.contains("labels +private"),
            "{text}"
        );
        assert!(
            text.contains("web.fetch") && text.contains("labels +untrusted"),
            "{text}"
        );
        assert!(text.contains("DENY   by no-exfil"), "{text}");
        assert!(text.contains("redacted pii.email"), "{text}");
    }

    #[test]
    fn cached_answers_are_drawn_under_their_call_with_the_producing_call() {
        let mut first = node(
            "c1",
            "",
            "planner",
            "tool.call",
            "coder",
            "code.search",
            "allow",
            &["p"],
        );
        first.cache = "miss".into();
        let mut stored = at(
            node(
                "r1",
                "c1",
                "coder",
                "tool.result",
                "planner",
                "code.search",
                "allow",
                &["m"],
            ),
            "planner",
            2,
        );
        stored.cache = "stored".into();
        stored.cache_source = "planner/c1".into();
        let mut repeat = at(
            node(
                "c2",
                "r1",
                "planner",
                "tool.call",
                "coder",
                "code.search",
                "allow",
                &["p"],
            ),
            "coder",
            3,
        );
        repeat.cache = "hit".into();
        repeat.cache_source = "planner/c1".into();
        // The planner's next step follows the cached answer.
        let answer = schemas::cache::answer_id("planner", "c2");
        let next = at(
            node("o1", &answer, "planner", "output", "", "", "allow", &["o"]),
            "coder",
            4,
        );
        let text = render("t", &[at(first, "", 1), stored, repeat, next]);
        let expected = "\
Decision tree of trace t: 4 steps, 0 denied, 1 answered from the cache
  planner   tool.call code.search → coder        allow  (p)
  └─ coder     tool.result → planner             allow  (m)  · stored in the cache
     └─ planner   tool.call code.search → coder  allow  (p)  · answered from the cache
        └─ coder     tool.result → planner       from the cache, first produced by call planner/c1
           └─ planner   output                   allow  (o)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_give_up_report_says_what_the_agent_gave_up_on() {
        let nodes = vec![
            node(
                "a",
                "",
                "planner",
                "task.handoff",
                "coder",
                "",
                "allow",
                &[],
            ),
            node("b", "a", "coder", "observation", "", "", "allow", &[]),
        ];
        let reports = HashMap::from([(
            "coder/b".to_owned(),
            "coder gave up on task.handoff a from planner after 5 attempts: missing field `task`"
                .to_owned(),
        )]);
        let text = render_with("t", &nodes, &reports);
        let expected = "\
Decision tree of trace t: 2 steps, 0 denied
  planner   task.handoff → coder                                                              allow
  └─ coder     gave up on task.handoff a from planner after 5 attempts: missing field `task`  allow
";
        assert_eq!(text, expected);
    }

    #[test]
    fn one_step_is_one_step() {
        let nodes = vec![node("a", "", "planner", "prompt", "", "", "allow", &["p1"])];
        let text = render("t", &nodes);
        assert_eq!(
            text.lines().next(),
            Some("Decision tree of trace t: 1 step, 0 denied"),
            "{text}"
        );
    }

    /// `node` with a parent agent and a time.
    fn at(mut n: Node, parent_agent: &str, time_us: u64) -> Node {
        n.parent_agent = parent_agent.into();
        n.time_us = time_us;
        n
    }

    // Over 80 lines on purpose: six steps written out (rustfmt gives each
    // node a dozen lines) and the tree they draw read best side by side.
    #[test]
    fn the_same_ids_in_two_agents_link_by_agent() {
        // planner and coder both count 1, 2, 3; the causation crosses.
        let nodes = vec![
            at(
                node("1", "", "planner", "prompt", "", "", "allow", &[]),
                "",
                1,
            ),
            at(
                node(
                    "2",
                    "1",
                    "planner",
                    "task.handoff",
                    "coder",
                    "",
                    "allow",
                    &[],
                ),
                "planner",
                2,
            ),
            at(
                node("1", "2", "coder", "reasoning", "", "", "allow", &[]),
                "planner",
                3,
            ),
            at(
                node(
                    "2",
                    "1",
                    "coder",
                    "tool.call",
                    "",
                    "shell.exec",
                    "deny",
                    &["forbid-shell-exec"],
                ),
                "coder",
                4,
            ),
            at(
                node("3", "2", "planner", "reasoning", "", "", "allow", &[]),
                "coder",
                5,
            ),
            at(
                node(
                    "3",
                    "2",
                    "coder",
                    "tool.result",
                    "planner",
                    "",
                    "allow",
                    &[],
                ),
                "planner",
                6,
            ),
        ];
        assert_eq!(
            parents(&nodes),
            vec![None, Some(0), Some(1), Some(2), Some(3), Some(1)]
        );
        let expected = "\
Decision tree of trace t: 6 steps, 1 denied
  planner   prompt                         allow
  └─ planner   task.handoff → coder        allow
     ├─ coder     reasoning                allow
     │  └─ coder     tool.call shell.exec  DENY   by forbid-shell-exec
     │     └─ planner   reasoning          allow
     └─ coder     tool.result → planner    allow
";
        assert_eq!(render("t", &nodes), expected);

        // Without parent agents (an older query): the step with that id
        // whose target is this step's agent, else the latest one before.
        let mut bare = nodes.clone();
        for n in &mut bare {
            n.parent_agent.clear();
        }
        assert_eq!(parents(&bare), parents(&nodes));
    }

    /// The reports query on a real ClickHouse (18.16 here) with the audit
    /// sink's tables: only the trace's `delivery.gave_up` observations count.
    #[tokio::test]
    async fn reports_are_read_from_the_events_table() {
        let ch = testkit::ClickHouseServer::start().await.unwrap();
        let db = ch.unique_database("tree");
        audit_tables::schema::ensure(&ch.client(), &db, 0)
            .await
            .unwrap();
        let client = ch.client().with_database(&db);
        let text = "coder gave up on task.handoff e1 from planner after 5 attempts: boom";
        let data = serde_json::json!({"text": text, "gave_up": {"attempts": 5}}).to_string();
        for (id, trace, subject) in [
            ("r1", "t1", GAVE_UP_SUBJECT),
            ("o1", "t1", "something else"),
            ("r2", "t2", GAVE_UP_SUBJECT),
        ] {
            client
                .query(
                    "INSERT INTO events (event_id, trace_id, agent, type, subject, data) VALUES (?, ?, 'coder', ?, ?, ?)",
                )
                .bind(id)
                .bind(trace)
                .bind(schemas::EventType::Observation.as_str())
                .bind(subject)
                .bind(data.as_str())
                .execute()
                .await
                .unwrap();
        }
        let found = reports(&client, "t1").await.unwrap();
        assert_eq!(
            found,
            HashMap::from([("coder/r1".to_owned(), text.to_owned())])
        );
    }

    #[test]
    fn orphans_and_cycles_are_drawn_once() {
        let nodes = vec![
            node("a", "missing", "planner", "prompt", "", "", "allow", &[]),
            node("b", "c", "coder", "reasoning", "", "", "allow", &[]),
            node("c", "b", "coder", "reasoning", "", "", "allow", &[]),
        ];
        let text = render("t", &nodes);
        // `a` is a root (its parent is not in the trace); the b/c cycle has
        // no root but each of its steps is still drawn once.
        let expected = "\
Decision tree of trace t: 3 steps, 0 denied
  planner   prompt        allow
  coder     reasoning     allow
  └─ coder     reasoning  allow
";
        assert_eq!(text, expected);
    }
}

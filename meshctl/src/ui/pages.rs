//! The pages, rendered on the server: the trace list, a trace's decision
//! tree (and the fragment the live view swaps in), denials, and errors.
//! Every value read from the audit is escaped here, once, on output.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use super::data::{DenialRow, Trace, TraceRow};
use super::filter::{DecisionFilter, DenialFilter, TraceFilter, Window};
use super::html::{Nav, duration_us, esc, page, q, time_us};
use crate::tree::{self, Node};

/// The most characters of a step's data or receipt a page shows.
const MAX_SHOWN: usize = 64 * 1024;

fn short_type(ty: &str) -> &str {
    ty.strip_prefix(schemas::TYPE_PREFIX).unwrap_or(ty)
}

/// The filter form's `since` and `until` fields.
fn window_fields(window: &Window) -> String {
    format!(
        "<label>since <input name=\"since\" value=\"{}\" size=\"20\" placeholder=\"24h, 2026-03-01\"></label>\n\
         <label>until <input name=\"until\" value=\"{}\" size=\"20\" placeholder=\"now\"></label>\n",
        esc(&window.since),
        esc(&window.until)
    )
}

fn agent_field(agent: Option<&str>) -> String {
    format!(
        "<label>agent <input name=\"agent\" value=\"{}\" size=\"12\"></label>\n",
        esc(agent.unwrap_or_default())
    )
}

/// The trace list: the filter form and one row per trace.
pub(super) fn traces(filter: &TraceFilter, rows: &[TraceRow]) -> String {
    let mut body =
        String::from("<h1>Traces</h1>\n<form class=\"filters\" method=\"get\" action=\"/\">\n");
    body.push_str(&agent_field(filter.agent.as_deref()));
    body.push_str("<label>decision <select name=\"decision\"><option value=\"\">any</option>");
    for d in DecisionFilter::ALL {
        let selected = if filter.decision == Some(d) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", d.as_str());
    }
    body.push_str("</select></label>\n");
    body.push_str(&window_fields(&filter.window));
    body.push_str("<button type=\"submit\">Filter</button>\n</form>\n");
    let _ = writeln!(
        body,
        "<p class=\"count\">{} trace{}{}</p>",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if rows.len() as u64 >= u64::from(filter.limit) {
            format!(" (the {} most recent; narrow the filter)", filter.limit)
        } else {
            String::new()
        }
    );
    if rows.is_empty() {
        body.push_str("<p class=\"empty\">No traces match this filter.</p>\n");
        return page("Traces", Nav::Traces, &body, false);
    }
    body.push_str(
        "<table class=\"traces\">\n<thead><tr><th>trace</th><th>agents</th><th>steps</th>\
         <th>allowed</th><th>denied</th><th>invalid</th><th>pending</th><th>started (UTC)</th><th>duration</th></tr></thead>\n<tbody>\n",
    );
    for row in rows {
        body.push_str(&trace_row(row));
    }
    body.push_str("</tbody>\n</table>\n");
    page("Traces", Nav::Traces, &body, false)
}

fn trace_row(row: &TraceRow) -> String {
    let mut agents = row.agents.clone();
    agents.sort();
    let agents: Vec<String> = agents
        .iter()
        .map(|a| format!("<a href=\"/?agent={}\">{}</a>", q(a), esc(a)))
        .collect();
    let pending = row.steps.saturating_sub(row.decided);
    let class = if row.denied > 0 {
        "trace denied"
    } else {
        "trace"
    };
    let id = esc(&row.trace_id);
    format!(
        "<tr class=\"{class}\" data-trace=\"{id}\"><td><a class=\"trace-id\" href=\"/trace/{id}\">{id}</a></td>\
         <td class=\"agents\">{}</td><td class=\"num steps\">{}</td><td class=\"num\">{}</td><td class=\"num denied\">{}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{pending}</td><td>{}</td><td class=\"num\">{}</td></tr>\n",
        agents.join(" "),
        row.steps,
        row.allowed,
        row.denied,
        row.invalid,
        time_us(row.first_us),
        duration_us(row.last_us.saturating_sub(row.first_us)),
    )
}

/// What the live view compares: the steps and their decisions.
pub(super) fn digest(nodes: &[Node]) -> String {
    let mut hash = Sha256::new();
    for n in nodes {
        hash.update(format!("{}\t{}\t{}\n", n.agent, n.event_id, n.decision).as_bytes());
    }
    hex::encode(&hash.finalize()[..8])
}

/// The trace page: the tree, kept current by `live.js`.
pub(super) fn trace(trace_id: &str, trace: &Trace) -> String {
    let id = esc(trace_id);
    let body = format!(
        "<h1>Trace <code>{id}</code></h1>\n\
         <p class=\"live\" id=\"live\">live: new steps and decisions appear as they arrive</p>\n\
         <section id=\"tree\" data-trace=\"{id}\" data-digest=\"{}\">\n{}</section>\n",
        digest(&trace.nodes),
        tree_fragment(trace)
    );
    page(&format!("Trace {trace_id}"), Nav::Traces, &body, true)
}

/// The summary line and the tree: what the live view replaces.
pub(super) fn tree_fragment(trace: &Trace) -> String {
    let nodes = &trace.nodes;
    let denied = nodes.iter().filter(|n| n.decision == "deny").count();
    let pending = nodes.iter().filter(|n| n.decision.is_empty()).count();
    let mut agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    let first = nodes.iter().map(|n| n.time_us).min().unwrap_or(0);
    let last = nodes.iter().map(|n| n.time_us).max().unwrap_or(0);
    let mut out = format!(
        "<p class=\"summary\"><span id=\"step-count\">{} steps</span>, <span class=\"{}\">{denied} denied</span>, \
         {pending} without decision · agents {} · {} UTC · {}</p>\n",
        nodes.len(),
        if denied > 0 { "denied" } else { "" },
        esc(&agents.join(", ")),
        time_us(first),
        duration_us(last.saturating_sub(first)),
    );
    out.push_str(&tree_html(trace));
    out
}

enum Op {
    Open(usize),
    Close,
}

/// Nested lists by causation: depth-first from each root, then from any
/// step a causation cycle left unreached, so every step appears once.
fn tree_html(trace: &Trace) -> String {
    let nodes = &trace.nodes;
    let tree::Links { roots, children } = tree::links(nodes);
    let mut seen = vec![false; nodes.len()];
    let mut out = String::from("<ul class=\"tree\">\n");
    for start in roots.iter().copied().chain(0..nodes.len()) {
        let mut stack = vec![Op::Open(start)];
        while let Some(op) = stack.pop() {
            let i = match op {
                Op::Close => {
                    out.push_str("</ul>\n</li>\n");
                    continue;
                }
                Op::Open(i) => i,
            };
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            out.push_str(&step(trace, &nodes[i]));
            if children[i].is_empty() {
                out.push_str("</li>\n");
            } else {
                out.push_str("<ul>\n");
                stack.push(Op::Close);
                stack.extend(children[i].iter().rev().map(|&c| Op::Open(c)));
            }
        }
    }
    out.push_str("</ul>\n");
    out
}

fn decision_label(node: &Node) -> (&'static str, String) {
    let mut reasons = node.reasons.clone();
    reasons.sort();
    let reasons = esc(&reasons.join(", "));
    let errors = esc(&node.errors.join("; "));
    match node.decision.as_str() {
        "allow" => ("allow", format!("<span class=\"decision allow\">allow</span> <span class=\"reasons\">{reasons}</span>")),
        "deny" if reasons.is_empty() => ("deny", format!("<span class=\"decision deny\">DENY</span> <span class=\"reasons\">fail closed: {errors}</span>")),
        "deny" => ("deny", format!("<span class=\"decision deny\">DENY</span> <span class=\"reasons\">by {reasons}</span>")),
        "invalid" => ("invalid", format!("<span class=\"decision invalid\">INVALID</span> <span class=\"reasons\">{errors}</span>")),
        "cached" => ("cached", format!("<span class=\"decision allow\">from the cache</span> <span class=\"reasons\">first produced by call {}</span>", esc(&node.cache_source))),
        "" => ("pending", "<span class=\"decision pending\" title=\"no receipt yet: parked for a human approval, or still being decided\">pending</span> <span class=\"reasons\">no decision yet (parked for approval, or in flight)</span>".to_owned()),
        other => ("other", format!("<span class=\"decision\">{}</span>", esc(other))),
    }
}

/// The shadow set's decision beside the live one, and an approval's answer.
fn annotations(node: &Node, trace: &Trace) -> String {
    let key = (node.agent.clone(), node.event_id.clone());
    let mut out = String::new();
    if !node.labels_added.is_empty() {
        let _ = write!(
            out,
            " <span class=\"labels\" title=\"the workflow picked these labels up here\">labels +{}</span>",
            esc(&node.labels_added.join(" +"))
        );
    }
    if !node.redacted.is_empty() {
        let _ = write!(
            out,
            " <span class=\"redacted\" title=\"delivered with these spans redacted\">redacted {}</span>",
            esc(&node.redacted.join(", "))
        );
    }
    let Some(r) = trace.receipts.get(&key) else {
        return out;
    };
    if !r.shadow_decision.is_empty() {
        let differs = r.shadow_decision != node.decision;
        let mut reasons = r.shadow_reasons.clone();
        reasons.sort();
        let _ = write!(
            out,
            " <span class=\"shadow{}\" title=\"the shadow policy set {}: {}\">shadow: {} {}</span>",
            if differs { " differs" } else { "" },
            esc(&r.shadow_policy_hash),
            if differs {
                "decides differently"
            } else {
                "agrees"
            },
            esc(&r.shadow_decision),
            esc(&reasons.join(", ")),
        );
    }
    if !r.approval_status.is_empty() {
        let by = if r.approver.is_empty() {
            String::new()
        } else {
            format!(" by {}", esc(&r.approver))
        };
        let comment = if r.approval_comment.is_empty() {
            String::new()
        } else {
            format!(": {}", esc(&r.approval_comment))
        };
        let _ = write!(
            out,
            " <span class=\"approval {}\">approval {}{by}{comment}</span>",
            esc(&r.approval_status),
            esc(&r.approval_status)
        );
    }
    out
}

/// One step: its line (a `<summary>`), and on click its details, data and
/// receipt. The `<li>` is left open for its children.
fn step(trace: &Trace, node: &Node) -> String {
    let (class, decision) = decision_label(node);
    let mut what = format!(
        "<span class=\"agent\">{}</span> <span class=\"type\">{}</span>",
        esc(&node.agent),
        esc(short_type(&node.r#type))
    );
    if !node.subject.is_empty() {
        let _ = write!(
            what,
            " <span class=\"subject\">{}</span>",
            esc(&node.subject)
        );
    }
    if !node.target.is_empty() {
        let _ = write!(
            what,
            " <span class=\"target\">→ {}</span>",
            esc(&node.target)
        );
    }
    format!(
        "<li class=\"step {class}\" id=\"step-{}\" data-agent=\"{}\" data-event=\"{}\">\n\
         <details><summary>{what} {decision}{}</summary>\n{}</details>\n",
        esc(&format!("{}/{}", node.agent, node.event_id)),
        esc(&node.agent),
        esc(&node.event_id),
        annotations(node, trace),
        details(trace, node),
    )
}

fn shown(text: &str) -> String {
    let pretty = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_owned());
    match pretty.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!(
            "{}\n… ({} more bytes)",
            esc(&pretty[..cut]),
            pretty.len() - cut
        ),
        None => esc(&pretty),
    }
}

fn details(trace: &Trace, node: &Node) -> String {
    let key = (node.agent.clone(), node.event_id.clone());
    let data = trace.data.get(&key);
    let parent = match (node.parent_id.as_str(), node.parent_agent.as_str()) {
        ("", _) => "(root)".to_owned(),
        (id, "") => id.to_owned(),
        (id, agent) => format!("{id} (of {agent})"),
    };
    let mut facts = vec![
        ("event id", node.event_id.clone()),
        ("caused by", parent),
        ("time (UTC)", time_us(node.time_us)),
        ("type", node.r#type.clone()),
        ("policy hash", node.policy_hash.clone()),
    ];
    if node.valid == 0 {
        facts.push(("invalid", node.error.clone()));
    }
    if let Some(d) = data {
        facts.push(("ingress subject", d.ingress_subject.clone()));
        facts.push(("content type", d.datacontenttype.clone()));
    }
    let mut out = String::from("<div class=\"detail\">\n<dl>\n");
    for (name, value) in facts.iter().filter(|(_, v)| !v.is_empty()) {
        let _ = writeln!(out, "<dt>{name}</dt><dd>{}</dd>", esc(value));
    }
    out.push_str("</dl>\n<h3>data</h3>\n");
    match data {
        Some(d) if d.data_encoding == "hex" => {
            let _ = writeln!(
                out,
                "<pre class=\"data\">(binary, hex) {}</pre>",
                shown(&d.data)
            );
        }
        Some(d) if !d.data.is_empty() => {
            let _ = writeln!(out, "<pre class=\"data\">{}</pre>", shown(&d.data));
        }
        _ => out.push_str("<p class=\"none\">(no data)</p>\n"),
    }
    out.push_str("<h3>receipt</h3>\n");
    match trace.receipts.get(&key) {
        Some(r) if !r.receipt.is_empty() => {
            let _ = writeln!(out, "<pre class=\"receipt\">{}</pre>", shown(&r.receipt));
        }
        _ => out.push_str("<p class=\"none\">(no receipt yet)</p>\n"),
    }
    out.push_str("</div>\n");
    out
}

/// The denials page: the filter form and one row per denial and policy.
pub(super) fn denials(filter: &DenialFilter, rows: &[DenialRow]) -> String {
    let mut body = String::from(
        "<h1>Denials</h1>\n<form class=\"filters\" method=\"get\" action=\"/denials\">\n",
    );
    body.push_str(&agent_field(filter.agent.as_deref()));
    body.push_str(&window_fields(&filter.window));
    body.push_str("<button type=\"submit\">Filter</button>\n</form>\n");
    let mut by_policy: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        *by_policy.entry(row.policy.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = by_policy
        .iter()
        .map(|(p, n)| format!("<span class=\"policy\">{}</span> {n}", esc(p)))
        .collect();
    let _ = writeln!(
        body,
        "<p class=\"count\">{} denial row{} (one per determining policy){}{}</p>",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if summary.is_empty() { "" } else { ": " },
        summary.join(", ")
    );
    if rows.is_empty() {
        body.push_str("<p class=\"empty\">No denials in this range.</p>\n");
        return page("Denials", Nav::Denials, &body, false);
    }
    body.push_str(
        "<table class=\"denials\">\n<thead><tr><th>decided (UTC)</th><th>agent</th><th>policy</th><th>type</th>\
         <th>subject</th><th>target</th><th>trace</th><th>errors</th></tr></thead>\n<tbody>\n",
    );
    for r in rows {
        let at = time_us(u64::from(r.time) * 1_000_000);
        let _ = writeln!(
            body,
            "<tr class=\"denial\"><td>{at}</td><td><a href=\"/denials?agent={}\">{}</a></td><td class=\"policy\">{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td><a href=\"/trace/{}#step-{}\">{}</a></td><td>{}</td></tr>",
            q(&r.agent),
            esc(&r.agent),
            esc(&r.policy),
            esc(short_type(&r.r#type)),
            esc(&r.subject),
            esc(&r.target),
            q(&r.trace_id),
            q(&format!("{}/{}", r.agent, r.event_id)),
            esc(&r.trace_id),
            esc(&r.errors.join("; ")),
        );
    }
    body.push_str("</tbody>\n</table>\n");
    page("Denials", Nav::Denials, &body, false)
}

/// An error page: the status and what went wrong.
pub(super) fn error(status: hyper::StatusCode, message: &str) -> String {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<h1>{}</h1>\n<p class=\"error\">{}</p>\n<p><a href=\"/\">All traces</a> · <a href=\"/denials\">Denials</a></p>\n",
        esc(&title),
        esc(message)
    );
    page(&title, Nav::None, &body, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::data::Receipt;

    fn node(id: &str, parent: &str, subject: &str, decision: &str) -> Node {
        Node {
            event_id: id.into(),
            parent_id: parent.into(),
            agent: "coder".into(),
            r#type: "io.agentmesh.tool.call".into(),
            target: String::new(),
            subject: subject.into(),
            time: 0,
            time_us: 0,
            decision: decision.into(),
            reasons: vec!["p2".into(), "p1".into()],
            errors: Vec::new(),
            policy_hash: "h".into(),
            valid: 1,
            error: String::new(),
            parent_agent: if parent.is_empty() {
                String::new()
            } else {
                "coder".into()
            },
            cache: String::new(),
            cache_source: String::new(),
            labels_added: Vec::new(),
            redacted: Vec::new(),
        }
    }

    #[test]
    fn draws_nested_steps_with_shadow_approval_and_pending() {
        let mut trace = Trace {
            nodes: vec![
                node("a", "", "web.search", "allow"),
                node("b", "a", "deploy.prod", "allow"),
                node("c", "a", "<script>x</script>", ""),
            ],
            ..Trace::default()
        };
        let receipt = |id: &str, shadow: &str, status: &str| Receipt {
            agent: "coder".into(),
            event_id: id.into(),
            shadow_decision: shadow.into(),
            shadow_reasons: vec!["no-web-search".into()],
            approval_status: status.into(),
            approver: "alice".into(),
            receipt: r#"{"decision":"allow"}"#.into(),
            ..Receipt::default()
        };
        for r in [receipt("a", "deny", ""), receipt("b", "", "approved")] {
            trace
                .receipts
                .insert(("coder".into(), r.event_id.clone()), r);
        }
        let html = tree_fragment(&trace);
        // a holds b and c, one level down; c waits without a receipt.
        let steps: Vec<&str> = html
            .lines()
            .filter(|l| l.starts_with("<li") || *l == "<ul>" || *l == "</ul>")
            .collect();
        assert_eq!(steps.len(), 6, "{html}");
        assert!(steps[0].starts_with("<li class=\"step allow\" id=\"step-coder/a\""));
        assert_eq!(steps[1], "<ul>");
        assert!(steps[2].starts_with("<li class=\"step allow\" id=\"step-coder/b\""));
        assert!(steps[3].starts_with("<li class=\"step pending\" id=\"step-coder/c\""));
        assert_eq!(steps[4..], ["</ul>", "</ul>"], "{html}");
        assert!(
            html.contains("<span class=\"reasons\">p1, p2</span>"),
            "{html}"
        );
        assert!(html.contains("shadow differs"), "{html}");
        assert!(html.contains("shadow: deny no-web-search"), "{html}");
        assert!(html.contains("approval approved by alice"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("&quot;decision&quot;: &quot;allow&quot;"),
            "{html}"
        );
    }
}

//! The SQL shipped for auditors (`audit-tables/sql/*.sql`) and the one way to
//! fill in its parameters.
//!
//! Parameters are written `{name:Type}`, the syntax current ClickHouse binds
//! natively (`clickhouse-client --param_name=...`, HTTP `?param_name=...`).
//! ClickHouse 18.16 predates that, so [`render`] (and the `sed` line in
//! `docs/audit.md`) replaces each placeholder by a literal: a quoted string
//! for `String` and `DateTime` (ClickHouse compares a `DateTime` column with
//! a `'YYYY-MM-DD hh:mm:ss'` string), digits for integer types. Both work on
//! every version. Table names are unqualified: run the files in the audit
//! database (`--database agentmesh`, `?database=agentmesh`).

use std::collections::BTreeMap;

/// One shipped query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// The file name without `.sql`, e.g. `decision_tree`.
    pub name: &'static str,
    /// The SQL text with `{name:Type}` placeholders.
    pub sql: &'static str,
}

/// The decision tree of one workflow: `{trace_id:String}`.
pub const DECISION_TREE: Query = Query {
    name: "decision_tree",
    sql: include_str!("../sql/decision_tree.sql"),
};
/// Every denial by agent and policy: `{from:DateTime}`, `{to:DateTime}`.
pub const DENIALS: Query = Query {
    name: "denials",
    sql: include_str!("../sql/denials.sql"),
};
/// Which tools each agent called: `{from:DateTime}`, `{to:DateTime}`.
pub const TOOLS_BY_AGENT: Query = Query {
    name: "tools_by_agent",
    sql: include_str!("../sql/tools_by_agent.sql"),
};
/// The slowest decisions: `{from:DateTime}`, `{to:DateTime}`, `{limit:UInt32}`.
pub const SLOWEST_DECISIONS: Query = Query {
    name: "slowest_decisions",
    sql: include_str!("../sql/slowest_decisions.sql"),
};

/// Events the shadow policy set decides differently: `{from:DateTime}`, `{to:DateTime}`.
pub const SHADOW_DISAGREEMENTS: Query = Query {
    name: "shadow_disagreements",
    sql: include_str!("../sql/shadow_disagreements.sql"),
};
/// Decisions that waited for a human, with the approver: `{from:DateTime}`, `{to:DateTime}`.
pub const APPROVALS: Query = Query {
    name: "approvals",
    sql: include_str!("../sql/approvals.sql"),
};

/// One row of [`DECISION_TREE`]: one step of the workflow with its
/// decision, in the query's column order (a test checks it against the SQL).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, clickhouse::Row)]
pub struct TreeNode {
    /// The event id.
    pub event_id: String,
    /// The causing event (`''` for a root).
    pub parent_id: String,
    /// The publishing agent.
    pub agent: String,
    /// The CloudEvents type.
    pub r#type: String,
    /// The target agent.
    pub target: String,
    /// The CloudEvents subject (the tool of a tool call).
    pub subject: String,
    /// Event time, seconds.
    pub time: u32,
    /// Event time, microseconds.
    pub time_us: u64,
    /// `allow`, `deny`, `invalid`, or `''` before the receipt is in.
    pub decision: String,
    /// The determining policies.
    pub reasons: Vec<String>,
    /// Evaluation or validation errors.
    pub errors: Vec<String>,
    /// The deciding policy set.
    pub policy_hash: String,
    /// Whether the event passed validation.
    pub valid: u8,
    /// Why not.
    pub error: String,
    /// The causing event's agent: its `causationsource`, else resolved by
    /// the query within the trace (`''` when no step has `parent_id`).
    pub parent_agent: String,
    /// What the tool-result cache did: `hit` (answered from the cache),
    /// `miss`, `bypass`, `stored` (this result filled it), '' when not asked.
    pub cache: String,
    /// On `hit` and `stored`: the call that first produced the cached
    /// result, `<agent>/<event id>`.
    pub cache_source: String,
    /// The workflow labels this step added (docs/guardrails.md).
    pub labels_added: Vec<String>,
    /// The detector kinds its redacted delivery replaced.
    pub redacted: Vec<String>,
}

/// Every shipped query.
pub const ALL: [Query; 6] = [
    DECISION_TREE,
    DENIALS,
    TOOLS_BY_AGENT,
    SLOWEST_DECISIONS,
    SHADOW_DISAGREEMENTS,
    APPROVALS,
];

/// What `meshctl policy replay` reads: the valid events the mesh received
/// in `[from_us, to_us)` (microseconds since the epoch), oldest first, as
/// [`crate::rows::EventRow`]s (`?fields` is the row type's column list, which
/// the `clickhouse` crate fills in).
pub fn replay_events(from_us: u64, to_us: u64) -> String {
    format!(
        "SELECT ?fields FROM {} FINAL WHERE valid = 1 AND {} \
         ORDER BY received_us, event_id, agent",
        crate::schema::EVENTS,
        replay_window(from_us, to_us)
    )
}

/// The recorded receipts of the events [`replay_events`] reads, as
/// [`crate::rows::DecisionRow`]s; they match on agent and event id (two
/// agents may use the same id).
pub fn replay_receipts(from_us: u64, to_us: u64) -> String {
    format!(
        "SELECT ?fields FROM {} FINAL WHERE valid = 1 \
         AND (agent, event_id) IN (SELECT agent, event_id FROM {} WHERE {})",
        crate::schema::DECISIONS,
        crate::schema::EVENTS,
        replay_window(from_us, to_us)
    )
}

/// Microseconds: a range ending now must include events of this second.
fn replay_window(from_us: u64, to_us: u64) -> String {
    format!("received_us >= {from_us} AND received_us < {to_us}")
}

/// Why a query could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenderError {
    /// A placeholder has no value.
    #[error("parameter `{0}` has no value")]
    Missing(String),
    /// A value does not fit its placeholder's type.
    #[error("parameter `{name}`: `{value}` is not a valid {ty}")]
    BadValue {
        /// The parameter.
        name: String,
        /// Its type in the placeholder.
        ty: String,
        /// The value given.
        value: String,
    },
    /// A placeholder type this renderer does not handle.
    #[error(
        "parameter `{name}` has type `{ty}`, which is not supported (String, DateTime, integers)"
    )]
    UnsupportedType {
        /// The parameter.
        name: String,
        /// Its type.
        ty: String,
    },
}

/// The placeholders of `sql`, as (name, type), in order of first appearance.
pub fn placeholders(sql: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let mut rest = sql;
    while let Some(start) = rest.find('{') {
        rest = &rest[start + 1..];
        let Some(end) = rest.find('}') else { break };
        if let Some((name, ty)) = parse_placeholder(&rest[..end])
            && !found.iter().any(|(n, _)| n == name)
        {
            found.push((name.to_owned(), ty.to_owned()));
        }
    }
    found
}

fn parse_placeholder(inner: &str) -> Option<(&str, &str)> {
    let (name, ty) = inner.split_once(':')?;
    let (name, ty) = (name.trim(), ty.trim());
    let ident =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (ident(name) && ident(ty)).then_some((name, ty))
}

/// Quotes `value` as a ClickHouse string literal.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The SQL for a `DateTime` parameter. An instant — RFC 3339 with its
/// offset, or Unix seconds — becomes `toDateTime(<seconds>)`, the same
/// instant whatever the server's time zone; a wall-clock time without a zone
/// (`YYYY-MM-DD hh:mm:ss` or `YYYY-MM-DD`) stays a quoted string, which
/// ClickHouse reads in the server's time zone.
fn datetime_literal(value: &str) -> Option<String> {
    let v = value.trim();
    let instant = |secs: i64| (secs >= 0).then(|| format!("toDateTime({secs})"));
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return instant(t.timestamp());
    }
    if let Ok(secs) = v.parse::<i64>() {
        return instant(secs);
    }
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S") {
        return Some(quote(&t.format("%Y-%m-%d %H:%M:%S").to_string()));
    }
    chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| quote(&t.format("%Y-%m-%d %H:%M:%S").to_string()))
}

/// Replaces every `{name:Type}` in `sql` by the literal for `params[name]`.
pub fn render(sql: &str, params: &BTreeMap<String, String>) -> Result<String, RenderError> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let parsed = after
            .find('}')
            .and_then(|end| parse_placeholder(&after[..end]).map(|p| (p, end)));
        let Some(((name, ty), end)) = parsed else {
            out.push('{');
            rest = after;
            continue;
        };
        let value = params
            .get(name)
            .ok_or_else(|| RenderError::Missing(name.to_owned()))?;
        let bad = || RenderError::BadValue {
            name: name.to_owned(),
            ty: ty.to_owned(),
            value: value.clone(),
        };
        let literal = match ty {
            "String" => quote(value),
            "DateTime" => datetime_literal(value).ok_or_else(bad)?,
            t if t.starts_with("UInt") && t[4..].parse::<u8>().is_ok() => {
                value.trim().parse::<u64>().map_err(|_| bad())?.to_string()
            }
            t if t.starts_with("Int") && t[3..].parse::<u8>().is_ok() => {
                value.trim().parse::<i64>().map_err(|_| bad())?.to_string()
            }
            _ => {
                return Err(RenderError::UnsupportedType {
                    name: name.to_owned(),
                    ty: ty.to_owned(),
                });
            }
        };
        out.push_str(&literal);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the outermost `SELECT` of `sql` returns, in order.
    fn selected_columns(sql: &str) -> Vec<String> {
        let body: String = sql
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        let start = body.find("SELECT").map(|i| i + "SELECT".len());
        let end = body.find("\nFROM");
        let (Some(start), Some(end)) = (start, end) else {
            panic!("no SELECT … FROM in {sql}");
        };
        body[start..end]
            .split(',')
            .map(|c| c.trim().to_owned())
            .collect()
    }

    /// RowBinary reads columns by position: the tree's row type names the
    /// query's columns in the query's order.
    #[test]
    fn the_tree_node_reads_the_decision_tree_query_s_columns() {
        use clickhouse::Row as _;
        let fields: Vec<String> = TreeNode::COLUMN_NAMES
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        assert_eq!(selected_columns(DECISION_TREE.sql), fields);
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn finds_placeholders() {
        assert_eq!(
            placeholders(SLOWEST_DECISIONS.sql),
            vec![
                ("from".to_owned(), "DateTime".to_owned()),
                ("to".to_owned(), "DateTime".to_owned()),
                ("limit".to_owned(), "UInt32".to_owned())
            ]
        );
        assert_eq!(
            placeholders(DECISION_TREE.sql),
            vec![("trace_id".to_owned(), "String".to_owned())]
        );
    }

    #[test]
    fn renders_literals() {
        let sql = "a = {a:String} AND t >= {t:DateTime} LIMIT {n:UInt32} -- {not a placeholder}";
        let out = render(
            sql,
            &params(&[
                ("a", "it's \\ ok"),
                ("t", "2026-01-02T03:04:05+01:00"),
                ("n", "20"),
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            r"a = 'it\'s \\ ok' AND t >= toDateTime(1767319445) LIMIT 20 -- {not a placeholder}"
        );
        // 2026-01-02T02:04:05Z: the same instant in any zone.
        assert_eq!(
            render("{t:DateTime}", &params(&[("t", "2026-01-02T02:04:05Z")])).unwrap(),
            "toDateTime(1767319445)"
        );
        assert_eq!(
            render("{t:DateTime}", &params(&[("t", "2026-01-02")])).unwrap(),
            "'2026-01-02 00:00:00'"
        );
        assert_eq!(
            render("{t:DateTime}", &params(&[("t", "2026-01-02 03:04:05")])).unwrap(),
            "'2026-01-02 03:04:05'"
        );
        assert_eq!(
            render("{t:DateTime}", &params(&[("t", "0")])).unwrap(),
            "toDateTime(0)"
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(
            render("{a:String}", &params(&[])),
            Err(RenderError::Missing("a".into()))
        );
        assert!(matches!(
            render("{n:UInt32}", &params(&[("n", "1; DROP")])),
            Err(RenderError::BadValue { .. })
        ));
        assert!(matches!(
            render("{t:DateTime}", &params(&[("t", "soon")])),
            Err(RenderError::BadValue { .. })
        ));
        assert!(matches!(
            render("{x:Array}", &params(&[("x", "1")])),
            Err(RenderError::UnsupportedType { .. })
        ));
    }
}

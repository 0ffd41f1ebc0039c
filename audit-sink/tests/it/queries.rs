//! The shipped SQL (`audit-tables/sql/*.sql`) against the real server the
//! harness starts (ClickHouse 18.16 on Debian), on rows the sink wrote —
//! every event and receipt published twice, so the answers also show that
//! duplicates collapse.

use crate::common;

use audit_sink::queries;
use common::{Harness, Step, at};
use schemas::{Decision, TraceParent};

fn step(
    id: &str,
    agent: &'static str,
    ty: &'static str,
    parent: Option<&str>,
    target: Option<&'static str>,
    tool: Option<&'static str>,
    offset: u32,
) -> Step {
    Step {
        id: id.to_owned(),
        agent,
        step: "step",
        ty,
        parent: parent.map(str::to_owned),
        parent_agent: None,
        target,
        tool,
        time: at(offset),
    }
}

#[tokio::test]
async fn shipped_queries_answer_auditors_questions() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let trace = TraceParent::mint();
    let other = TraceParent::mint();
    #[rustfmt::skip]
    let decided: Vec<(Step, Decision, Vec<&str>, u64)> = vec![
        (step("p1", "planner", "io.agentmesh.prompt", None, None, None, 0), Decision::Allow, vec!["members-record-steps"], 50),
        (step("p2", "planner", "io.agentmesh.task.handoff", Some("p1"), Some("coder"), None, 1), Decision::Allow, vec!["orchestrators-hand-off"], 80),
        (step("c1", "coder", "io.agentmesh.tool.call", Some("p2"), None, Some("code.search"), 2), Decision::Allow, vec!["members-call-low-risk-tools"], 120),
        (step("c2", "coder", "io.agentmesh.tool.result", Some("c1"), None, None, 3), Decision::Allow, vec!["members-message-members"], 40),
        (step("c3", "coder", "io.agentmesh.tool.call", Some("p2"), None, Some("shell.exec"), 4), Decision::Deny, vec!["forbid-high-risk-tools", "forbid-shell-exec"], 300),
        (step("r1", "reviewer", "io.agentmesh.tool.call", Some("p2"), None, Some("shell.exec"), 5), Decision::Deny, vec!["forbid-shell-exec"], 90),
    ];
    // A tool call whose decision has not arrived.
    let undecided = step(
        "c4",
        "coder",
        "io.agentmesh.tool.call",
        Some("p2"),
        None,
        Some("tests.run"),
        6,
    );
    // A denial of another workflow, two hours later: outside the range below.
    let late = step(
        "late",
        "coder",
        "io.agentmesh.tool.call",
        None,
        None,
        Some("shell.exec"),
        7200,
    );

    for _ in 0..2 {
        for (s, decision, reasons, micros) in &decided {
            h.publish(&s.message(&trace)).await?;
            h.publish(&s.receipt(&trace, *decision, reasons, *micros))
                .await?;
        }
        h.publish(&undecided.message(&trace)).await?;
        h.publish(&late.message(&other)).await?;
        h.publish(&late.receipt(&other, Decision::Deny, &["forbid-shell-exec"], 1000))
            .await?;
    }
    // Wait for every copy, not just one: the answers must not depend on
    // whether ClickHouse merged the duplicates yet.
    h.wait_raw_rows("events", 16).await?;
    h.wait_raw_rows("decisions", 14).await?;

    let trace_id = trace.trace_id_hex();
    let tree = h
        .shipped(queries::DECISION_TREE, &[("trace_id", &trace_id)])
        .await?;
    let cols = |line: &str| -> String {
        // event_id, parent_id, agent, type, target, subject, decision, reasons
        let f: Vec<&str> = line.split('\t').collect();
        [f[0], f[1], f[2], f[3], f[4], f[5], f[8], f[9]].join(" | ")
    };
    assert_eq!(
        tree.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec![
            "p1 |  | planner | io.agentmesh.prompt |  |  | allow | ['members-record-steps']",
            "p2 | p1 | planner | io.agentmesh.task.handoff | coder |  | allow | ['orchestrators-hand-off']",
            "c1 | p2 | coder | io.agentmesh.tool.call |  | code.search | allow | ['members-call-low-risk-tools']",
            "c2 | c1 | coder | io.agentmesh.tool.result |  |  | allow | ['members-message-members']",
            "c3 | p2 | coder | io.agentmesh.tool.call |  | shell.exec | deny | ['forbid-high-risk-tools','forbid-shell-exec']",
            "r1 | p2 | reviewer | io.agentmesh.tool.call |  | shell.exec | deny | ['forbid-shell-exec']",
            "c4 | p2 | coder | io.agentmesh.tool.call |  | tests.run |  | []",
        ]
    );

    let range = [
        ("from", "2026-03-01 10:00:00"),
        ("to", "2026-03-01 11:00:00"),
    ];
    let denials = h.shipped(queries::DENIALS, &range).await?;
    let cols = |line: &str| -> String {
        // agent, policy, time, event_id, trace_id, type, target, subject
        let f: Vec<&str> = line.split('\t').collect();
        [f[0], f[1], f[2], f[3], f[7]].join(" | ")
    };
    assert_eq!(
        denials.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec![
            "coder | forbid-high-risk-tools | 2026-03-01 10:00:04 | c3 | shell.exec",
            "coder | forbid-shell-exec | 2026-03-01 10:00:04 | c3 | shell.exec",
            "reviewer | forbid-shell-exec | 2026-03-01 10:00:05 | r1 | shell.exec",
        ]
    );
    // The same hour as instants (rendered as `toDateTime(<seconds>)`), from
    // another zone and as Unix seconds.
    for instants in [
        [
            ("from", "2026-03-01T11:00:00+01:00"),
            ("to", "2026-03-01T12:00:00+01:00"),
        ],
        [("from", "1772359200"), ("to", "1772362800")],
    ] {
        assert_eq!(
            h.shipped(queries::DENIALS, &instants).await?,
            denials,
            "{instants:?}"
        );
    }
    let all_day = [("from", "2026-03-01"), ("to", "2026-03-02")];
    assert_eq!(
        h.shipped(queries::DENIALS, &all_day).await?.len(),
        4,
        "the late denial is in the day"
    );

    let tools = h.shipped(queries::TOOLS_BY_AGENT, &range).await?;
    let cols = |line: &str| -> String {
        // agent, tool, calls, allowed, denied, invalid, undecided
        line.split('\t').take(7).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(
        tools.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec![
            "coder code.search 1 1 0 0 0",
            "coder shell.exec 1 0 1 0 0",
            "coder tests.run 1 0 0 0 1",
            "reviewer shell.exec 1 0 1 0 0",
        ]
    );

    let slowest = h
        .shipped(
            queries::SLOWEST_DECISIONS,
            &[range[0], range[1], ("limit", "3")],
        )
        .await?;
    let cols = |line: &str| -> String {
        // eval_micros, time, decision, agent, type, target, subject, event_id
        let f: Vec<&str> = line.split('\t').collect();
        [f[0], f[2], f[7]].join(" ")
    };
    assert_eq!(
        slowest.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec!["300 deny c3", "120 allow c1", "90 deny r1"]
    );

    sink.stop().await
}

#[tokio::test]
async fn every_shipped_query_runs_on_this_server() -> anyhow::Result<()> {
    // Empty tables: each file parses and runs with every placeholder filled.
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    for query in queries::ALL {
        let params: Vec<(String, String)> = queries::placeholders(query.sql)
            .into_iter()
            .map(|(name, ty)| {
                let value = match ty.as_str() {
                    "DateTime" => "2026-01-01 00:00:00",
                    "String" => "4bf92f3577b34da6a3ce929d0e0e4736",
                    _ => "10",
                };
                (name, value.to_owned())
            })
            .collect();
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let rows = h.shipped(query, &params).await;
        assert!(
            matches!(&rows, Ok(r) if r.is_empty()),
            "{}: {rows:?}",
            query.name
        );
    }
    sink.stop().await
}

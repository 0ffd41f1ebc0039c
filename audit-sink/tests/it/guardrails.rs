//! The guardrail columns of `decisions` against the real server the harness
//! starts (ClickHouse 18.16 on Debian): shadow decisions and approvals land
//! in their columns, the shipped `shadow_disagreements.sql` and
//! `approvals.sql` answer from them, and a `decisions` table created by an
//! older release gains the columns without losing rows.

#![expect(clippy::expect_used, reason = "a panic is how a test or bench fails")]

use crate::common;

use audit_sink::queries;
use bytes::Bytes;
use common::{Harness, Message, at};
use schemas::{Approval, ApprovalStatus, Decision, DecisionReceipt, TraceParent, subjects};

fn receipt(id: &str, offset: u32, decision: Decision, reasons: &[&str]) -> DecisionReceipt {
    DecisionReceipt {
        event_id: id.into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        decision,
        reasons: reasons.iter().map(|s| s.to_string()).collect(),
        policy_hash: "active-hash".into(),
        decision_id: format!("d-{id}"),
        agent: "coder".into(),
        event_type: "io.agentmesh.tool.call".into(),
        subject: Some("code.search".into()),
        decided_at: at(offset),
        ingress_subject: subjects::ingress("coder", "tool_call"),
        ..Default::default()
    }
}

fn message(r: &DecisionReceipt) -> Message {
    Message {
        subject: subjects::decision(&r.agent),
        headers: None,
        payload: Bytes::from(serde_json::to_vec(r).expect("receipt serialises")),
    }
}

fn shadowed(mut r: DecisionReceipt, decision: Decision, reasons: &[&str]) -> DecisionReceipt {
    r.shadow_decision = Some(decision);
    r.shadow_reasons = reasons.iter().map(|s| s.to_string()).collect();
    r.shadow_policy_hash = Some("shadow-hash".into());
    r
}

#[tokio::test]
async fn shadow_disagreements_and_approvals_are_listed_by_sql() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let allow = ["members-call-low-risk-tools"];
    let receipts = vec![
        // Agree.
        shadowed(
            receipt("g1", 0, Decision::Allow, &allow),
            Decision::Allow,
            &allow,
        ),
        // The shadow set would deny what is allowed today.
        shadowed(
            receipt("g2", 1, Decision::Allow, &allow),
            Decision::Deny,
            &["forbid-code-search"],
        ),
        // And allow what is denied today.
        shadowed(
            receipt("g3", 2, Decision::Deny, &["forbid-x"]),
            Decision::Allow,
            &allow,
        ),
        // No shadow set ran: not a disagreement.
        receipt("g4", 3, Decision::Deny, &["forbid-x"]),
        // Waited for a human.
        {
            let mut r = receipt("g5", 4, Decision::Allow, &["deploys-need-approval"]);
            r.findings = vec!["pii.email".into()];
            r.approval = Some(Approval {
                id: "ap5".into(),
                status: ApprovalStatus::Approved,
                approver: "alice".into(),
                comment: "ship it".into(),
                requested_at: at(3),
                answered_at: at(4),
            });
            r
        },
        {
            let mut r = receipt("g6", 5, Decision::Deny, &["deploys-need-approval"]);
            r.approval = Some(Approval {
                id: "ap6".into(),
                status: ApprovalStatus::Expired,
                approver: String::new(),
                comment: "no answer".into(),
                requested_at: at(3),
                answered_at: at(5),
            });
            r
        },
    ];
    for r in &receipts {
        // Twice: duplicates collapse.
        h.publish(&message(r)).await?;
        h.publish(&message(r)).await?;
    }
    h.wait_raw_rows("decisions", 12).await?;

    let range = [
        ("from", "2026-03-01 09:00:00"),
        ("to", "2026-03-01 11:00:00"),
    ];
    let rows = h.shipped(queries::SHADOW_DISAGREEMENTS, &range).await?;
    // time, agent, type, target, subject, decision, reasons, shadow_decision,
    // shadow_reasons, policy_hash, shadow_policy_hash, event_id, trace_id
    let cols = |line: &str| {
        let f: Vec<&str> = line.split('\t').collect();
        format!("{} {} {} {} {}", f[11], f[5], f[7], f[8], f[10])
    };
    assert_eq!(
        rows.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec![
            "g3 deny allow ['members-call-low-risk-tools'] shadow-hash",
            "g2 allow deny ['forbid-code-search'] shadow-hash",
        ]
    );

    let rows = h.shipped(queries::APPROVALS, &range).await?;
    // time, agent, type, target, subject, approval_status, approver,
    // approval_comment, decision, reasons, approval_id, event_id, trace_id
    let cols = |line: &str| {
        let f: Vec<&str> = line.split('\t').collect();
        format!("{} {} {} {} {}", f[11], f[5], f[6], f[7], f[8])
    };
    assert_eq!(
        rows.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec![
            "g5 approved alice ship it allow",
            "g6 expired  no answer deny"
        ]
    );
    assert_eq!(
        h.query("SELECT findings FROM decisions FINAL WHERE event_id = 'g5'")
            .await?
            .trim(),
        "['pii.email']"
    );
    sink.stop().await
}

#[tokio::test]
async fn an_older_decisions_table_gains_the_guardrail_columns() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let db = h.db();
    // `decisions` as the first release created it, with one row.
    for sql in [
        format!("CREATE DATABASE IF NOT EXISTS `{db}`"),
        format!(
            "CREATE TABLE `{db}`.decisions (event_id String, trace_id String, decision_id String, \
             agent String, type String, target String, subject String, parent_id String, \
             decision String, reasons Array(String), errors Array(String), policy_hash String, \
             time DateTime, time_us UInt64, eval_micros UInt64, ingress_subject String, \
             trace_derived UInt8, receipt String, receipt_encoding String, valid UInt8, \
             error String, stream_seq UInt64, received_at DateTime, received_us UInt64, \
             msg_key String) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(time) \
             ORDER BY (trace_id, event_id, msg_key)"
        ),
        format!(
            "INSERT INTO `{db}`.decisions (event_id, trace_id, decision, time) \
             VALUES ('old', 't', 'allow', toDateTime('2026-03-01 10:00:00'))"
        ),
    ] {
        h.ch().client().query(&sql).execute().await?;
    }

    let sink = h.spawn_sink(h.config()).await?;
    let columns = h
        .query(&format!(
            "SELECT name FROM system.columns WHERE database = '{db}' AND table = 'decisions' ORDER BY name"
        ))
        .await?;
    // Every column added since: guardrails, cache, signed decisions and
    // batch signatures (`batch_root`, `batch_proof`, `batch_signature`).
    let added = audit_sink::schema::added_columns(
        audit_sink::schema::DECISIONS,
        &audit_sink::schema::ServerFeatures::from_version("18.16.1"),
    );
    assert!(added.iter().any(|(name, _)| *name == "batch_proof"));
    for (name, _) in added {
        assert!(
            columns.lines().any(|c| c == name),
            "{name} missing:\n{columns}"
        );
    }
    let trace = TraceParent::mint();
    let mut new = receipt("new", 10, Decision::Allow, &["p"]);
    new.trace_id = trace.trace_id_hex();
    let new = shadowed(new, Decision::Deny, &["q"]);
    h.publish(&message(&new)).await?;
    h.wait_rows("decisions", 2).await?;
    assert_eq!(
        h.query(
            "SELECT event_id, decision, shadow_decision FROM decisions FINAL ORDER BY event_id"
        )
        .await?,
        "new\tallow\tdeny\nold\tallow\t\n"
    );
    // A second start finds nothing to add.
    sink.stop().await?;
    let sink = h.spawn_sink(h.config()).await?;
    sink.stop().await
}

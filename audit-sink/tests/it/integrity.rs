//! The audit keeps every row whatever the agents send: two agents' events
//! with the same id both survive and link to the right parents, tables of
//! the old layout are migrated without losing a row, a row ClickHouse
//! refuses is quarantined without holding up the rows after it, and agent
//! times spread over many months do not matter. Against real NATS and
//! ClickHouse servers.

use crate::common;

use audit_sink::{Config, queries, schema};
use common::{Harness, Message, Step, at};
use schemas::{Decision, TraceParent};
use telemetry::testing::http_get;
use testkit::{WAIT, eventually, sample_value};

#[expect(
    clippy::too_many_arguments,
    reason = "a test fixture that names every column it sets"
)]
fn step(
    id: &str,
    agent: &'static str,
    ty: &'static str,
    parent: Option<&str>,
    parent_agent: Option<&'static str>,
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
        parent_agent,
        target,
        tool,
        time: at(offset),
    }
}

/// Publishes `message` and returns its stream sequence.
async fn publish_seq(h: &Harness, message: &Message) -> anyhow::Result<u64> {
    let ack = match &message.headers {
        Some(headers) => {
            h.js.publish_with_headers(
                message.subject.clone(),
                headers.clone(),
                message.payload.clone(),
            )
            .await?
        }
        None => {
            h.js.publish(message.subject.clone(), message.payload.clone())
                .await?
        }
    };
    Ok(ack.await?.sequence)
}

#[tokio::test]
async fn two_agents_with_the_same_ids_keep_their_rows_and_parents() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let trace = TraceParent::mint();
    // planner and coder both count 1, 2, 3 in one workflow; causation
    // crosses between them, with and without `causationsource`.
    #[rustfmt::skip]
    let steps: Vec<(Step, Decision, Vec<&str>)> = vec![
        (step("1", "planner", "io.agentmesh.prompt", None, None, None, None, 0), Decision::Allow, vec!["p-prompt"]),
        (step("2", "planner", "io.agentmesh.task.handoff", Some("1"), Some("planner"), Some("coder"), None, 1), Decision::Allow, vec!["p-handoff"]),
        (step("1", "coder", "io.agentmesh.reasoning", Some("2"), Some("planner"), None, None, 2), Decision::Allow, vec!["c-reasoning"]),
        // No causationsource: planner's `1` and coder's `1` both precede
        // it; the latest (coder's) is the parent.
        (step("2", "coder", "io.agentmesh.tool.call", Some("1"), None, None, Some("shell.exec"), 3), Decision::Deny, vec!["forbid-shell-exec"]),
        (step("3", "planner", "io.agentmesh.reasoning", Some("2"), Some("coder"), None, None, 4), Decision::Allow, vec!["p-reasoning"]),
        // No causationsource: planner's `2` targets coder, so it is the
        // parent although coder's `2` came later.
        (step("3", "coder", "io.agentmesh.tool.result", Some("2"), None, Some("planner"), None, 5), Decision::Allow, vec!["c-result"]),
    ];
    // Twice: the copies collapse, the two agents' rows do not.
    for _ in 0..2 {
        for (s, decision, reasons) in &steps {
            h.publish(&s.message(&trace)).await?;
            h.publish(&s.receipt(&trace, *decision, reasons, 10))
                .await?;
        }
    }
    h.wait_raw_rows("events", 12).await?;
    h.wait_raw_rows("decisions", 12).await?;
    assert_eq!(h.count_final("events").await?, 6);
    assert_eq!(h.count_final("decisions").await?, 6);

    let events = h
        .query(
            "SELECT agent, event_id, parent_id, parent_agent, type FROM events FINAL \
             ORDER BY agent, event_id",
        )
        .await?;
    assert_eq!(
        events,
        "coder\t1\t2\tplanner\tio.agentmesh.reasoning\n\
         coder\t2\t1\t\tio.agentmesh.tool.call\n\
         coder\t3\t2\t\tio.agentmesh.tool.result\n\
         planner\t1\t\t\tio.agentmesh.prompt\n\
         planner\t2\t1\tplanner\tio.agentmesh.task.handoff\n\
         planner\t3\t2\tcoder\tio.agentmesh.reasoning\n"
    );
    let decisions = h
        .query(
            "SELECT agent, event_id, decision, reasons, parent_agent FROM decisions FINAL \
             ORDER BY agent, event_id",
        )
        .await?;
    assert_eq!(
        decisions,
        "coder\t1\tallow\t['c-reasoning']\tplanner\n\
         coder\t2\tdeny\t['forbid-shell-exec']\t\n\
         coder\t3\tallow\t['c-result']\t\n\
         planner\t1\tallow\t['p-prompt']\t\n\
         planner\t2\tallow\t['p-handoff']\tplanner\n\
         planner\t3\tallow\t['p-reasoning']\tcoder\n"
    );

    let tree = h
        .shipped(
            queries::DECISION_TREE,
            &[("trace_id", &trace.trace_id_hex())],
        )
        .await?;
    let cols = |line: &str| -> String {
        // agent/event_id <- parent_agent/parent_id, decision, reasons
        let f: Vec<&str> = line.split('\t').collect();
        format!("{}/{} <- {}/{} {} {}", f[2], f[0], f[14], f[1], f[8], f[9])
    };
    assert_eq!(
        tree.iter().map(|l| cols(l)).collect::<Vec<_>>(),
        vec![
            "planner/1 <- / allow ['p-prompt']",
            "planner/2 <- planner/1 allow ['p-handoff']",
            "coder/1 <- planner/2 allow ['c-reasoning']",
            "coder/2 <- coder/1 deny ['forbid-shell-exec']",
            "planner/3 <- coder/2 allow ['p-reasoning']",
            "coder/3 <- planner/2 allow ['c-result']",
        ]
    );
    let tools = h
        .shipped(
            queries::TOOLS_BY_AGENT,
            &[
                ("from", "2026-03-01 10:00:00"),
                ("to", "2026-03-01 11:00:00"),
            ],
        )
        .await?;
    let tools: Vec<String> = tools
        .iter()
        .map(|l| l.split('\t').take(7).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(tools, vec!["coder shell.exec 1 0 1 0 0"]);
    sink.stop().await
}

/// The `CREATE TABLE`s of the release that keyed rows by event id alone and
/// partitioned `events` by the agent's `time` (as 18.16 got them).
fn old_layout(db: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE `{db}`.events (event_id String, trace_id String, parent_id String, \
             agent String, type String, target String, subject String, time DateTime, \
             time_us UInt64, source String, traceparent String, trace_derived UInt8, \
             content_mode String, datacontenttype String, dataschema String, data String, \
             data_encoding String, valid UInt8, error String, ingress_subject String, \
             stream_seq UInt64, received_at DateTime, received_us UInt64, msg_key String) \
             ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(time) \
             ORDER BY (trace_id, event_id, msg_key)"
        ),
        format!(
            "CREATE TABLE `{db}`.decisions (event_id String, trace_id String, decision_id String, \
             agent String, type String, target String, subject String, parent_id String, \
             decision String, reasons Array(String), errors Array(String), policy_hash String, \
             time DateTime, time_us UInt64, eval_micros UInt64, ingress_subject String, \
             trace_derived UInt8, receipt String, receipt_encoding String, valid UInt8, \
             error String, stream_seq UInt64, received_at DateTime, received_us UInt64, \
             msg_key String, findings Array(String), shadow_decision String, \
             shadow_reasons Array(String), shadow_errors Array(String), \
             shadow_policy_hash String, approval_id String, approval_status String, \
             approver String, approval_comment String) \
             ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(time) \
             ORDER BY (trace_id, event_id, msg_key)"
        ),
    ]
}

#[tokio::test]
async fn tables_of_the_old_layout_are_migrated_without_losing_rows() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let db = h.db();
    let client = h.ch().client();
    client
        .query_raw(&format!("CREATE DATABASE `{db}`"))
        .execute()
        .await?;
    for create in old_layout(db) {
        client.query_raw(&create).execute().await?;
    }
    for insert in [
        format!(
            "INSERT INTO `{db}`.events (event_id, trace_id, parent_id, agent, type, time, received_at, data) VALUES \
             ('o1', 'ta', '', 'planner', 'io.agentmesh.prompt', toDateTime('2019-05-01 00:00:00'), toDateTime('2026-03-01 10:00:00'), 'x'), \
             ('o2', 'ta', 'o1', 'coder', 'io.agentmesh.reasoning', toDateTime('2026-03-01 10:00:01'), toDateTime('2026-03-01 10:00:01'), 'y')"
        ),
        // A second insert: two parts, one of them with a duplicate.
        format!(
            "INSERT INTO `{db}`.events (event_id, trace_id, parent_id, agent, type, time, received_at, data) VALUES \
             ('o3', 'tb', '', 'coder', 'io.agentmesh.prompt', toDateTime('2026-03-01 10:00:02'), toDateTime('2026-03-01 10:00:02'), ''), \
             ('o2', 'ta', 'o1', 'coder', 'io.agentmesh.reasoning', toDateTime('2026-03-01 10:00:01'), toDateTime('2026-03-01 10:00:01'), 'y')"
        ),
        format!(
            "INSERT INTO `{db}`.decisions (event_id, trace_id, agent, decision, reasons, time) VALUES \
             ('o1', 'ta', 'planner', 'allow', ['p'], toDateTime('2026-03-01 10:00:00')), \
             ('o2', 'ta', 'coder', 'deny', ['q'], toDateTime('2026-03-01 10:00:01'))"
        ),
    ] {
        client.query_raw(&insert).execute().await?;
    }
    let raw_events = h.query("SELECT count() FROM events").await?;
    assert_eq!(raw_events, "4\n");

    let sink = h.spawn_sink(h.config()).await?;
    let engines = h
        .query(&format!(
            "SELECT name, engine_full FROM system.tables WHERE database = '{db}' ORDER BY name"
        ))
        .await?;
    let engine = |table: &str| -> String {
        engines
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{table}\t")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        engine("events").contains(
            "PARTITION BY toYYYYMM(received_at) ORDER BY (trace_id, agent, event_id, msg_key)"
        ),
        "{engines}"
    );
    assert!(
        engine("decisions")
            .contains("PARTITION BY toYYYYMM(time) ORDER BY (trace_id, agent, event_id, msg_key)"),
        "{engines}"
    );
    let names: Vec<&str> = engines
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        vec![
            "decisions",
            "decisions_old_layout",
            "events",
            "events_old_layout",
            "gpu_leases",
            "rejected"
        ]
    );
    // Every old row is in the new tables, values kept, new columns empty.
    assert_eq!(
        h.query(
            "SELECT event_id, trace_id, parent_id, agent, time, data, parent_agent \
             FROM events FINAL ORDER BY event_id"
        )
        .await?,
        "o1\tta\t\tplanner\t2019-05-01 00:00:00\tx\t\n\
         o2\tta\to1\tcoder\t2026-03-01 10:00:01\ty\t\n\
         o3\ttb\t\tcoder\t2026-03-01 10:00:02\t\t\n"
    );
    assert_eq!(
        h.query("SELECT event_id, agent, decision, reasons FROM decisions FINAL ORDER BY event_id")
            .await?,
        "o1\tplanner\tallow\t['p']\no2\tcoder\tdeny\t['q']\n"
    );
    // The old tables are kept, whole.
    assert_eq!(
        h.query("SELECT count() FROM events_old_layout").await?,
        "4\n"
    );
    assert_eq!(
        h.query("SELECT count() FROM decisions_old_layout").await?,
        "2\n"
    );

    // The migrated tables keep two agents' events with the same id.
    let trace = TraceParent::mint();
    for agent in ["planner", "coder"] {
        let s = step(
            "o1",
            agent,
            "io.agentmesh.prompt",
            None,
            None,
            None,
            None,
            9,
        );
        h.publish(&s.message(&trace)).await?;
        h.publish(&s.receipt(&trace, Decision::Allow, &[], 1))
            .await?;
    }
    h.wait_rows("events", 5).await?;
    h.wait_rows("decisions", 4).await?;
    assert_eq!(
        h.query(&format!(
            "SELECT agent FROM events FINAL WHERE trace_id = '{}' ORDER BY agent",
            trace.trace_id_hex()
        ))
        .await?,
        "coder\nplanner\n"
    );

    // A second start finds nothing to migrate.
    sink.stop().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let tables = h
        .query(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}'"
        ))
        .await?;
    assert_eq!(tables, "6\n");
    assert_eq!(h.count_final("events").await?, 5);
    sink.stop().await
}

#[tokio::test]
async fn a_refused_row_is_quarantined_and_the_rows_after_it_go_on() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    // The schema first, then a column that makes the server refuse one
    // agent's rows (18.16 has `throwIf`).
    schema::ensure(&h.ch().client(), h.db(), 0).await?;
    h.query("ALTER TABLE events ADD COLUMN guard UInt8 MATERIALIZED throwIf(agent = 'poison')")
        .await?;
    let trace = TraceParent::mint();
    let good = |i: u32| {
        step(
            &format!("g{i}"),
            "planner",
            "io.agentmesh.reasoning",
            None,
            None,
            None,
            None,
            i,
        )
    };
    let poison = step(
        "bad",
        "poison",
        "io.agentmesh.reasoning",
        None,
        None,
        None,
        None,
        5,
    );
    // Published before the sink starts, so they share its first batch.
    for i in 0..5 {
        publish_seq(&h, &good(i).message(&trace)).await?;
    }
    let poison_seq = publish_seq(&h, &poison.message(&trace)).await?;
    for i in 5..10 {
        publish_seq(&h, &good(i).message(&trace)).await?;
    }

    let config: Config = Harness::with_metrics(h.config())?;
    let metrics = Harness::metrics_addr(&config).expect("metrics port");
    let sink = h.spawn_sink(config).await?;
    let count = || async {
        h.query("SELECT count() FROM events FINAL")
            .await
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    eventually(WAIT, "the 10 good events", || async {
        (count().await? >= 10).then_some(())
    })
    .await?;
    // The good rows go in while the batch is split, the refused one after.
    let rejected = eventually(WAIT, "the quarantined row", || async {
        let rows = h
            .query(
                "SELECT `table`, stream, subject, stream_seq, error, row, payload_encoding \
                 FROM rejected FINAL",
            )
            .await
            .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .await?;
    let fields: Vec<&str> = rejected.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 7, "one quarantined row: {rejected}");
    assert_eq!(
        fields[..4],
        [
            "events",
            "MESH_INGRESS",
            "mesh.ingress.poison.step",
            &poison_seq.to_string()
        ]
    );
    assert!(
        fields[4].starts_with("Code: 395") && fields[4].contains("throwIf"),
        "the server's error: {}",
        fields[4]
    );
    assert!(
        fields[5].contains(r#""event_id":"bad""#) && fields[5].contains(r#""agent":"poison""#),
        "the row as JSON: {}",
        fields[5]
    );
    assert_eq!(fields[6], "utf8");
    assert_eq!(
        h.query("SELECT count() FROM events FINAL WHERE agent = 'poison'")
            .await?,
        "0\n"
    );

    // The events after it are not held up.
    for i in 10..13 {
        h.publish(&good(i).message(&trace)).await?;
    }
    eventually(WAIT, "the 3 later events", || async {
        (count().await? >= 13).then_some(())
    })
    .await?;
    let quarantined = eventually(WAIT, "the quarantine metric", || async move {
        let (_, body) = http_get(metrics, "/metrics").await.ok()?;
        let n = sample_value(
            &body,
            "agentmesh_sink_rows_quarantined_total{table=\"events\"}",
        );
        (n >= 1.0).then_some(n)
    })
    .await?;
    assert_eq!(quarantined, 1.0);

    // Once the cause is gone, the row goes back in from its JSON, as
    // docs/audit.md shows.
    h.query("ALTER TABLE events DROP COLUMN guard").await?;
    let row = h
        .query("SELECT row FROM rejected FINAL WHERE `table` = 'events' FORMAT TabSeparatedRaw")
        .await?;
    h.ch()
        .client()
        .with_database(h.db())
        .query_raw(&format!(
            "INSERT INTO events FORMAT JSONEachRow {}",
            row.trim_end()
        ))
        .execute()
        .await?;
    assert_eq!(
        h.query("SELECT event_id, agent, stream_seq FROM events FINAL WHERE agent = 'poison'")
            .await?,
        format!("bad\tpoison\t{poison_seq}\n")
    );
    assert_eq!(count().await, Some(14));
    sink.stop().await
}

#[tokio::test]
async fn agent_times_over_150_months_neither_stall_nor_split_the_table() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let trace = TraceParent::mint();
    let start = chrono::DateTime::parse_from_rfc3339("2010-01-15T12:00:00Z")?;
    for i in 0..150u32 {
        let mut s = step(
            &format!("m{i:03}"),
            "coder",
            "io.agentmesh.reasoning",
            None,
            None,
            None,
            None,
            0,
        );
        let time = start
            .checked_add_months(chrono::Months::new(i))
            .expect("in range");
        s.time = time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        h.publish(&s.message(&trace)).await?;
    }
    eventually(WAIT, "150 events", || async {
        let n: u64 = h
            .query("SELECT count() FROM events FINAL")
            .await
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (n >= 150).then_some(())
    })
    .await?;
    // The agents' times are kept as they wrote them…
    assert_eq!(
        h.query("SELECT min(time), max(time), uniqExact(toYYYYMM(time)) FROM events FINAL")
            .await?,
        "2010-01-15 12:00:00\t2022-06-15 12:00:00\t150\n"
    );
    // …but the table is partitioned by when the mesh received them: one or
    // two months (should the test cross a month's end), not 150 (a current
    // ClickHouse refuses an insert into more than 100 partitions).
    let partitions: u64 = h
        .query(&format!(
            "SELECT uniqExact(partition) FROM system.parts \
             WHERE database = '{}' AND table = 'events' AND active",
            h.db()
        ))
        .await?
        .trim()
        .parse()?;
    assert!(partitions <= 2, "{partitions} partitions");
    sink.stop().await
}

//! Every ingress event, decision receipt and GPU lease event reaches its
//! table, bad messages included, against real NATS and ClickHouse servers.

use crate::common;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::{Harness, Message, chain};
use schemas::{
    Decision, EventBuilder, EventBuilderV10, TraceParent, encode_binary, encode_structured,
    subjects,
};
use serde_json::json;

#[tokio::test]
async fn every_event_and_decision_reaches_its_table() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    // Some published before the sink starts, some after: the durable
    // consumers see both.
    let trace = TraceParent::mint();
    let steps = chain("wf", 60);
    for step in &steps[..30] {
        h.publish(&step.message(&trace)).await?;
        h.publish(&step.receipt(&trace, Decision::Allow, &["allow-all"], 10))
            .await?;
    }
    let sink = h.spawn_sink(h.config()).await?;
    for step in &steps[30..] {
        h.publish(&step.message(&trace)).await?;
        h.publish(&step.receipt(&trace, Decision::Allow, &["allow-all"], 10))
            .await?;
    }
    // A structured-mode event without traceparent.
    let structured = EventBuilderV10::new()
        .id("structured-1")
        .source("/agents/reviewer")
        .ty("io.agentmesh.output")
        .data("application/json", json!({"verdict": "ship it"}))
        .build()?;
    let (sh, sp) = encode_structured(&structured);
    h.publish(&Message {
        subject: subjects::ingress("reviewer", "output"),
        headers: Some(sh),
        payload: sp,
    })
    .await?;

    h.wait_rows("events", 61).await?;
    h.wait_rows("decisions", 60).await?;

    let ids = h
        .query(&format!(
            "SELECT event_id FROM events FINAL WHERE trace_id = '{}' ORDER BY event_id",
            trace.trace_id_hex()
        ))
        .await?;
    let expected: Vec<String> = steps.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids.lines().collect::<Vec<_>>(), expected);

    // Columns of one event as published.
    let row = h
        .query(
            "SELECT agent, type, parent_id, subject, time, data, data_encoding, valid, ingress_subject \
             FROM events FINAL WHERE event_id = 'wf-00001'",
        )
        .await?;
    // The data byte for byte as published (key order depends on serde_json's
    // features, so compare with the payload itself).
    let published = steps[1].message(&trace).payload;
    assert_eq!(
        row,
        format!(
            "coder\tio.agentmesh.tool.call\twf-00000\tfs.read\t2026-03-01 10:00:01\t{}\tutf8\t1\tmesh.ingress.coder.tool_call\n",
            std::str::from_utf8(&published)?
        )
    );
    let row = h
        .query(
            "SELECT trace_id, trace_derived, content_mode, data FROM events FINAL WHERE event_id = 'structured-1'",
        )
        .await?;
    assert_eq!(
        row,
        format!(
            "{}\t1\tstructured\t{{\"verdict\":\"ship it\"}}\n",
            TraceParent::derive("structured-1").trace_id_hex()
        )
    );
    let row = h
        .query("SELECT decision, reasons, policy_hash, parent_id, time FROM decisions FINAL WHERE event_id = 'wf-00002'")
        .await?;
    assert_eq!(
        row,
        "allow\t['allow-all']\ttest-policy-hash\twf-00001\t2026-03-01 10:00:02\n"
    );

    sink.stop().await
}

#[tokio::test]
async fn bad_messages_are_stored_without_blocking_the_batch() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let trace = TraceParent::mint();
    let steps = chain("ok", 4);

    // Interleave good and bad messages so they share batches.
    h.publish(&steps[0].message(&trace)).await?;
    // 1. Data that is not UTF-8, in an otherwise valid event.
    let binary = EventBuilderV10::new()
        .id("bad-bytes")
        .source("/agents/coder")
        .ty("io.agentmesh.observation")
        .data(
            "application/octet-stream",
            vec![0xde, 0xad, 0xff, 0x00, 0xbe],
        )
        .build()?;
    let (bh, bp) = encode_binary(&binary);
    h.publish(&Message {
        subject: subjects::ingress("coder", "observation"),
        headers: Some(bh),
        payload: bp,
    })
    .await?;
    h.publish(&steps[1].message(&trace)).await?;
    // 2. Not a CloudEvent at all, with bytes that are not UTF-8.
    h.publish(&Message {
        subject: subjects::ingress("coder", "junk"),
        headers: None,
        payload: Bytes::from_static(b"\xff\xfejunk"),
    })
    .await?;
    // 3. A source that does not match the subject (invalid, but decodes).
    let spoof = EventBuilderV10::new()
        .id("spoofed")
        .source("/agents/planner")
        .ty("io.agentmesh.prompt")
        .build()?;
    let (ph, pp) = encode_binary(&spoof);
    h.publish(&Message {
        subject: subjects::ingress("coder", "prompt"),
        headers: Some(ph),
        payload: pp,
    })
    .await?;
    // 4. Structured mode that is not JSON.
    let mut sh = HeaderMap::new();
    sh.insert("Content-Type", "application/cloudevents+json");
    h.publish(&Message {
        subject: subjects::ingress("coder", "broken"),
        headers: Some(sh),
        payload: Bytes::from_static(b"{not json"),
    })
    .await?;
    h.publish(&steps[2].message(&trace)).await?;
    // 5. A receipt that is not a receipt, and a valid one.
    h.publish(&Message {
        subject: subjects::decision("coder"),
        headers: None,
        payload: Bytes::from_static(b"\x00\xffnot a receipt"),
    })
    .await?;
    h.publish(&steps[0].receipt(&trace, Decision::Allow, &[], 1))
        .await?;
    // 6. A GPU lease event with data that is not the lease JSON.
    let lease = EventBuilderV10::new()
        .id("lease-bad")
        .source("/gpu-scaler/a")
        .ty("io.agentmesh.gpu.lease.granted")
        .data("application/json", json!(["not", "an", "object"]))
        .build()?;
    let (lh, lp) = encode_binary(&lease);
    h.publish(&Message {
        subject: subjects::gpu_lease("coder"),
        headers: Some(lh),
        payload: lp,
    })
    .await?;
    h.publish(&steps[3].message(&trace)).await?;

    h.wait_rows("events", 8).await?;
    h.wait_rows("decisions", 2).await?;
    h.wait_rows("gpu_leases", 1).await?;

    let valid = h
        .query("SELECT event_id FROM events FINAL WHERE valid = 1 ORDER BY event_id")
        .await?;
    assert_eq!(valid, "bad-bytes\nok-00000\nok-00001\nok-00002\nok-00003\n");
    // The bytes come back whole.
    let bytes = h
        .query(
            "SELECT data_encoding, hex(unhex(data)) FROM events FINAL WHERE event_id = 'bad-bytes'",
        )
        .await?;
    assert_eq!(bytes, "hex\tDEADFF00BE\n");
    let junk = h
        .query("SELECT event_id, data_encoding, data, valid, msg_key != '' FROM events FINAL WHERE ingress_subject = 'mesh.ingress.coder.junk'")
        .await?;
    assert_eq!(junk, format!("\thex\t{}\t0\t1\n", hex_of(b"\xff\xfejunk")));
    let spoofed = h
        .query(
            "SELECT agent, source, valid, error != '' FROM events FINAL WHERE event_id = 'spoofed'",
        )
        .await?;
    assert_eq!(spoofed, "coder\t/agents/planner\t0\t1\n");
    let broken = h
        .query("SELECT data, data_encoding, valid FROM events FINAL WHERE ingress_subject = 'mesh.ingress.coder.broken'")
        .await?;
    assert_eq!(broken, "{not json\tutf8\t0\n");

    let receipts = h
        .query("SELECT valid, receipt_encoding, agent FROM decisions FINAL ORDER BY valid")
        .await?;
    assert_eq!(receipts, "0\thex\tcoder\n1\tutf8\tplanner\n");
    let lease = h
        .query("SELECT event_id, pool, action, valid, error != '' FROM gpu_leases FINAL")
        .await?;
    assert_eq!(lease, "lease-bad\tcoder\tgranted\t0\t1\n");

    sink.stop().await
}

#[tokio::test]
async fn gpu_lease_events_reach_their_table() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    for (i, (ty, pool, gpu)) in [
        ("io.agentmesh.gpu.lease.granted", "coder", "GPU-aaaa"),
        ("io.agentmesh.gpu.lease.granted", "reviewer", "GPU-bbbb"),
        ("io.agentmesh.gpu.lease.released", "coder", "GPU-aaaa"),
    ]
    .into_iter()
    .enumerate()
    {
        let event = EventBuilderV10::new()
            .id(format!("lease-{i}"))
            .source("/gpu-scaler/node-1")
            .ty(ty)
            .time(common::at(u32::try_from(i)?))
            .data(
                "application/json",
                json!({"pool": pool, "gpu": gpu, "holder": format!("{pool}-0"), "expires_at": common::at(600)}),
            )
            .build()?;
        let (headers, payload) = encode_binary(&event);
        h.publish(&Message {
            subject: subjects::gpu_lease(pool),
            headers: Some(headers),
            payload,
        })
        .await?;
    }
    h.wait_rows("gpu_leases", 3).await?;
    let rows = h
        .query("SELECT pool, gpu, action, holder, time, expires_at, valid FROM gpu_leases FINAL ORDER BY time, event_id")
        .await?;
    assert_eq!(
        rows,
        "coder\tGPU-aaaa\tgranted\tcoder-0\t2026-03-01 10:00:00\t2026-03-01 10:10:00\t1\n\
         reviewer\tGPU-bbbb\tgranted\treviewer-0\t2026-03-01 10:00:01\t2026-03-01 10:10:00\t1\n\
         coder\tGPU-aaaa\treleased\tcoder-0\t2026-03-01 10:00:02\t2026-03-01 10:10:00\t1\n"
    );
    sink.stop().await
}

#[tokio::test]
async fn schema_creation_is_idempotent() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let sink = h.spawn_sink(h.config()).await?;
    let trace = TraceParent::mint();
    let step = &chain("idem", 1)[0];
    h.publish(&step.message(&trace)).await?;
    h.wait_rows("events", 1).await?;
    sink.stop().await?;
    // A second start over existing tables keeps the data.
    let sink = h.spawn_sink(h.config()).await?;
    assert_eq!(h.count_final("events").await?, 1);
    let tables = h
        .query(&format!(
            "SELECT name FROM system.tables WHERE database = '{}' ORDER BY name",
            h.db()
        ))
        .await?;
    assert_eq!(tables, "decisions\nevents\ngpu_leases\nrejected\n");
    sink.stop().await
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn restart_with_other_consumer_settings_keeps_the_cursor() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let trace = TraceParent::mint();
    let steps = chain("cur", 4);
    let sink = h.spawn_sink(h.config()).await?;
    h.publish(&steps[0].message(&trace)).await?;
    h.wait_rows("events", 1).await?;
    sink.stop().await?;

    // Published while the sink is down, then picked up by a sink whose
    // consumer settings (ack wait, max ack pending) differ.
    for step in &steps[1..] {
        h.publish(&step.message(&trace)).await?;
    }
    let mut config = h.config();
    config.ack_wait_ms = 7_000;
    config.batch_rows = 50;
    let sink = h.spawn_sink(config).await?;
    h.wait_rows("events", 4).await?;
    assert_eq!(h.count_final("events").await?, 4);
    let mut consumer =
        h.js.get_stream(subjects::STREAM_INGRESS)
            .await?
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("audit-sink-events")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = consumer.info().await?;
    // The server took the new settings for the same durable cursor.
    assert_eq!(info.config.ack_wait, std::time::Duration::from_secs(7));
    assert_eq!(info.config.max_ack_pending, 100);
    sink.stop().await
}

#[tokio::test]
async fn a_batch_is_flushed_once_its_stream_goes_quiet() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    // The period alone would hold these rows for an hour, far past the
    // test's wait: the idle flush must insert them.
    let mut config = Harness::with_metrics(h.config())?;
    config.batch_period_ms = 3_600_000;
    config.batch_idle_ms = 100;
    let metrics = Harness::metrics_addr(&config).expect("metrics port");
    let sink = h.spawn_sink(config).await?;
    let trace = TraceParent::mint();
    for step in &chain("quiet", 3) {
        h.publish(&step.message(&trace)).await?;
        h.publish(&step.receipt(&trace, Decision::Allow, &["allow-all"], 10))
            .await?;
    }
    h.wait_rows("events", 3).await?;
    h.wait_rows("decisions", 3).await?;
    // Each table's batches were ended by the quiet, none by the period.
    let (_, body) = telemetry::testing::http_get(metrics, "/metrics").await?;
    for table in ["events", "decisions"] {
        let cut = |reason: &str| {
            testkit::sample_value(
                &body,
                &format!("agentmesh_sink_batches_total{{reason=\"{reason}\",table=\"{table}\"}}"),
            )
        };
        assert!(cut("idle") >= 1.0, "{table}: {body}");
        assert_eq!(cut("period"), 0.0, "{table}");
    }
    sink.stop().await
}

//! End-to-end tests of the policy worker against a real nats-server: the
//! real binary decides events that tests publish like any NATS client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use async_nats::HeaderMap;
use schemas::{Decision, EventBuilder, TraceParent, headers, subjects};
use support::*;

fn same_headers_except_mesh(original: &HeaderMap, delivered: &HeaderMap) {
    for (name, values) in original.iter() {
        let got = delivered
            .get_all(name.clone())
            .map(|v| v.as_str().to_owned())
            .collect::<Vec<_>>();
        let want = values
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect::<Vec<_>>();
        assert_eq!(got, want, "header `{name}` changed on delivery");
    }
}

#[tokio::test]
async fn approved_binary_event_is_delivered_byte_for_byte() {
    let mesh = Mesh::start().await;
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let event = schemas::EventBuilderV10::from(handoff("e-binary"))
        .subject("Überarbeite \"parser\" 100% — bitte")
        .extension("causationid", "e-root")
        .build()
        .unwrap();
    let (original_headers, payload) = schemas::encode_binary(&event);
    mesh.publish(
        "mesh.ingress.planner.handoff",
        original_headers.clone(),
        payload.clone(),
    )
    .await;

    let receipt = mesh.receipt("e-binary").await;
    assert_eq!(receipt.decision, Decision::Allow);
    assert_eq!(receipt.reasons, vec!["orchestrators-hand-off".to_owned()]);
    assert_eq!(receipt.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(receipt.policy_hash.len(), 16);
    assert!(receipt.errors.is_empty(), "{:?}", receipt.errors);

    let delivered = mesh.wait_messages(subjects::STREAM_DELIVER, 1).await;
    assert_eq!(delivered.len(), 1);
    let d = &delivered[0];
    assert_eq!(d.subject.as_str(), "mesh.deliver.coder.planner");
    assert_eq!(d.payload, payload, "data changed on delivery");
    same_headers_except_mesh(&original_headers, &d.headers);
    assert_eq!(
        header(&d.headers, "Nats-Msg-Id").as_deref(),
        Some("e-binary")
    );
    assert_eq!(
        header(&d.headers, headers::POLICY_HASH),
        Some(receipt.policy_hash.clone())
    );
    assert_eq!(
        header(&d.headers, headers::DECISION_ID),
        Some(receipt.decision_id.clone())
    );
    // The percent-encoded subject survives as sent, and decodes back.
    let (decoded, _) = schemas::decode(Some(&d.headers), &d.payload).unwrap();
    assert_eq!(
        schemas::AttributesReader::subject(&decoded),
        Some("Überarbeite \"parser\" 100% — bitte")
    );
}

#[tokio::test]
async fn approved_structured_event_is_delivered_byte_for_byte() {
    let mesh = Mesh::start().await;
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let (original_headers, payload) = schemas::encode_structured(&handoff("e-structured"));
    mesh.publish(
        "mesh.ingress.planner.handoff",
        original_headers.clone(),
        payload.clone(),
    )
    .await;

    assert_eq!(mesh.receipt("e-structured").await.decision, Decision::Allow);
    let delivered = mesh.wait_messages(subjects::STREAM_DELIVER, 1).await;
    assert_eq!(delivered[0].payload, payload);
    same_headers_except_mesh(&original_headers, &delivered[0].headers);
}

#[tokio::test]
async fn denied_tool_call_is_dead_lettered_not_delivered() {
    let mesh = Mesh::start().await;
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let call = event("e-shell", "coder", "tool.call")
        .subject("shell.exec")
        .extension("target", "reviewer")
        .data("application/json", serde_json::json!({"cmd": "rm -rf /"}))
        .build()
        .unwrap();
    mesh.publish_event("mesh.ingress.coder.tool_call", &call)
        .await;
    // An allowed event after it, to know the worker is past the denial.
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("e-after"))
        .await;

    let receipt = mesh.receipt("e-shell").await;
    assert_eq!(receipt.decision, Decision::Deny);
    assert!(
        receipt.reasons.contains(&"forbid-shell-exec".to_owned()),
        "{:?}",
        receipt.reasons
    );
    assert_eq!(receipt.subject.as_deref(), Some("shell.exec"));
    mesh.receipt("e-after").await;

    let delivered = mesh.wait_messages(subjects::STREAM_DELIVER, 1).await;
    assert_eq!(delivered.len(), 1, "only the handoff may be delivered");
    assert_eq!(
        header(&delivered[0].headers, "Nats-Msg-Id").as_deref(),
        Some("e-after")
    );

    let dead = mesh.wait_messages(subjects::STREAM_DEAD, 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].subject.as_str(), "mesh.dead.coder");
    assert_eq!(
        header(&dead[0].headers, headers::DECISION).as_deref(),
        Some("deny")
    );
    assert!(
        header(&dead[0].headers, headers::POLICIES)
            .unwrap()
            .contains("forbid-shell-exec")
    );
    assert_eq!(
        header(&dead[0].headers, "ce-id").as_deref(),
        Some("e-shell")
    );
}

#[tokio::test]
async fn every_bad_input_gets_one_receipt_and_one_dead_letter() {
    let mesh = Mesh::start().await;
    let policies = policies_copy();
    let _worker = WorkerProcess::start(
        &mesh.nats.url(),
        policies.path(),
        &["--max-event-bytes", "4096"],
    )
    .await;

    // No headers at all.
    mesh.publish("mesh.ingress.planner.x", HeaderMap::new(), "hello")
        .await;
    // Structured mode, payload not JSON.
    let mut structured = HeaderMap::new();
    structured.insert("Content-Type", schemas::STRUCTURED_CONTENT_TYPE);
    mesh.publish("mesh.ingress.planner.x", structured, "{not json")
        .await;
    // Wrong specversion.
    let mut old = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "0.3"),
        ("ce-id", "bad-version"),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.prompt"),
    ] {
        old.insert(k, v);
    }
    mesh.publish("mesh.ingress.planner.x", old, "").await;
    // Source does not match the subject.
    mesh.publish_event(
        "mesh.ingress.planner.x",
        &event("bad-source", "coder", "prompt").build().unwrap(),
    )
    .await;
    // Oversized.
    let big = event("bad-size", "planner", "prompt")
        .data("text/plain", "x".repeat(8192))
        .build()
        .unwrap();
    mesh.publish_event("mesh.ingress.planner.x", &big).await;
    // Unknown type, in a trace the agent started.
    let agents_trace = TraceParent::mint();
    mesh.publish_event(
        "mesh.ingress.planner.x",
        &event("bad-type", "planner", "teleport")
            .extension("traceparent", agents_trace.to_string())
            .build()
            .unwrap(),
    )
    .await;
    // Unregistered agent (well-formed, so it is decided by policy: deny).
    mesh.publish_event(
        "mesh.ingress.mallory.x",
        &event("unregistered", "mallory", "prompt").build().unwrap(),
    )
    .await;
    // Invalid UTF-8 after percent-decoding.
    let mut overlong = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bad-utf8"),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.prompt"),
        ("ce-subject", "%C0%A0"),
    ] {
        overlong.insert(k, v);
    }
    mesh.publish("mesh.ingress.planner.x", overlong, "").await;
    // And a good event last: the worker must still be deciding.
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("good"))
        .await;

    mesh.receipt("good").await;
    let receipts = mesh.wait_messages(subjects::STREAM_DECISION, 9).await;
    assert_eq!(receipts.len(), 9, "exactly one receipt per event");
    let receipts = mesh.receipts().await;
    let by_id = |id: &str| {
        receipts
            .iter()
            .find(|r| r.event_id == id)
            .unwrap_or_else(|| panic!("no receipt for {id}: {receipts:#?}"))
    };

    let invalid: Vec<_> = receipts
        .iter()
        .filter(|r| r.decision == Decision::Invalid)
        .collect();
    assert_eq!(invalid.len(), 7, "{receipts:#?}");
    assert!(by_id("bad-version").errors[0].contains("specversion `0.3`"));
    assert!(by_id("bad-source").errors[0].contains("does not match"));
    assert!(by_id("bad-size").errors[0].contains("over the limit of 4096"));
    assert!(by_id("bad-type").errors[0].contains("not in the catalogue"));
    assert!(by_id("bad-utf8").errors[0].contains("not valid UTF-8"));
    // An invalid event stays in the agent's trace when its traceparent
    // parses (the audit sink records the same); otherwise its trace is
    // derived from its id.
    assert_eq!(by_id("bad-type").trace_id, agents_trace.trace_id_hex());
    assert!(!by_id("bad-type").trace_derived);
    assert_eq!(
        by_id("bad-version").trace_id,
        TraceParent::derive("bad-version").trace_id_hex()
    );
    assert!(by_id("bad-version").trace_derived);
    let unregistered = by_id("unregistered");
    assert_eq!(unregistered.decision, Decision::Deny);
    assert!(
        unregistered
            .errors
            .iter()
            .any(|e| e.contains("not registered"))
    );
    // The two without an id still name their problem.
    assert!(
        invalid
            .iter()
            .any(|r| r.event_id.is_empty() && r.errors[0].contains("not a CloudEvent"))
    );
    assert!(
        invalid
            .iter()
            .any(|r| r.errors[0].contains("not a CloudEvents JSON event"))
    );

    let dead = mesh.wait_messages(subjects::STREAM_DEAD, 8).await;
    assert_eq!(dead.len(), 8, "one dead letter per invalid or denied event");
    assert!(
        dead.iter()
            .all(|d| d.headers.get(headers::REASON).is_some())
    );
    assert!(
        dead.iter()
            .any(|d| d.subject.as_str() == "mesh.dead.mallory")
    );
    assert_eq!(mesh.count(subjects::STREAM_DELIVER).await, 1);
}

#[tokio::test]
async fn duplicate_event_id_is_delivered_once() {
    let mesh = Mesh::start().await;
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    for _ in 0..3 {
        mesh.publish_event("mesh.ingress.planner.handoff", &handoff("dup"))
            .await;
    }
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("marker"))
        .await;
    mesh.receipt("marker").await;
    // The worker has consumed all four ingress messages once it acks them.
    let consumer_done = || async {
        let mut c = mesh
            .stream(subjects::STREAM_INGRESS)
            .await
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("policy-worker")
            .await
            .ok()?;
        let info = c.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    };
    testkit::eventually(WAIT, "the worker to ack every ingress event", consumer_done)
        .await
        .unwrap();
    assert_eq!(mesh.count(subjects::STREAM_DELIVER).await, 2);
    let receipts = mesh.receipts().await;
    assert_eq!(receipts.iter().filter(|r| r.event_id == "dup").count(), 1);
}

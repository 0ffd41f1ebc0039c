//! End-to-end tests of the policy worker against a real nats-server: the
//! real binary decides events that tests publish like any NATS client.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::support;

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
    let mesh = Mesh::start().await.unwrap();
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
    .await
    .unwrap();

    let receipt = mesh.receipt("e-binary").await.unwrap();
    assert_eq!(receipt.decision, Decision::Allow);
    assert_eq!(receipt.reasons, vec!["orchestrators-hand-off".to_owned()]);
    assert_eq!(receipt.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(receipt.policy_hash.len(), 16);
    assert!(receipt.errors.is_empty(), "{:?}", receipt.errors);

    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 1)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1);
    let d = &delivered[0];
    assert_eq!(d.subject.as_str(), "mesh.deliver.coder.planner");
    assert_eq!(d.payload, payload, "data changed on delivery");
    same_headers_except_mesh(&original_headers, &d.headers);
    assert_eq!(
        header(&d.headers, "Nats-Msg-Id").as_deref(),
        Some("planner/e-binary")
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
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let (original_headers, payload) = schemas::encode_structured(&handoff("e-structured"));
    mesh.publish(
        "mesh.ingress.planner.handoff",
        original_headers.clone(),
        payload.clone(),
    )
    .await
    .unwrap();

    assert_eq!(
        mesh.receipt("e-structured").await.unwrap().decision,
        Decision::Allow
    );
    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 1)
        .await
        .unwrap();
    assert_eq!(delivered[0].payload, payload);
    same_headers_except_mesh(&original_headers, &delivered[0].headers);
}

#[tokio::test]
async fn denied_tool_call_is_dead_lettered_not_delivered() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let call = event("e-shell", "coder", "tool.call")
        .subject("shell.exec")
        .extension("target", "reviewer")
        .data("application/json", serde_json::json!({"cmd": "rm -rf /"}))
        .build()
        .unwrap();
    mesh.publish_event("mesh.ingress.coder.tool_call", &call)
        .await
        .unwrap();
    // An allowed event after it, to know the worker is past the denial.
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("e-after"))
        .await
        .unwrap();

    let receipt = mesh.receipt("e-shell").await.unwrap();
    assert_eq!(receipt.decision, Decision::Deny);
    assert!(
        receipt.reasons.contains(&"forbid-shell-exec".to_owned()),
        "{:?}",
        receipt.reasons
    );
    assert_eq!(receipt.subject.as_deref(), Some("shell.exec"));
    mesh.receipt("e-after").await.unwrap();

    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 1)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1, "only the handoff may be delivered");
    assert_eq!(
        header(&delivered[0].headers, "Nats-Msg-Id").as_deref(),
        Some("planner/e-after")
    );

    let dead = mesh.wait_messages(subjects::STREAM_DEAD, 1).await.unwrap();
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
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(
        &mesh.nats.url(),
        policies.path(),
        &["--max-event-bytes", "4096"],
    )
    .await;

    // No headers at all.
    mesh.publish("mesh.ingress.planner.x", HeaderMap::new(), "hello")
        .await
        .unwrap();
    // Structured mode, payload not JSON.
    let mut structured = HeaderMap::new();
    structured.insert("Content-Type", schemas::STRUCTURED_CONTENT_TYPE);
    mesh.publish("mesh.ingress.planner.x", structured, "{not json")
        .await
        .unwrap();
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
    mesh.publish("mesh.ingress.planner.x", old, "")
        .await
        .unwrap();
    // Source does not match the subject.
    mesh.publish_event(
        "mesh.ingress.planner.x",
        &event("bad-source", "coder", "prompt").build().unwrap(),
    )
    .await
    .unwrap();
    // Oversized.
    let big = event("bad-size", "planner", "prompt")
        .data("text/plain", "x".repeat(8192))
        .build()
        .unwrap();
    mesh.publish_event("mesh.ingress.planner.x", &big)
        .await
        .unwrap();
    // Unknown type, in a trace the agent started.
    let agents_trace = TraceParent::mint();
    mesh.publish_event(
        "mesh.ingress.planner.x",
        &event("bad-type", "planner", "teleport")
            .extension("traceparent", agents_trace.to_string())
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    // Unregistered agent (well-formed, so it is decided by policy: deny).
    mesh.publish_event(
        "mesh.ingress.mallory.x",
        &event("unregistered", "mallory", "prompt").build().unwrap(),
    )
    .await
    .unwrap();
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
    mesh.publish("mesh.ingress.planner.x", overlong, "")
        .await
        .unwrap();
    // And a good event last: the worker must still be deciding.
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("good"))
        .await
        .unwrap();

    mesh.receipt("good").await.unwrap();
    let receipts = mesh
        .wait_messages(subjects::STREAM_DECISION, 9)
        .await
        .unwrap();
    assert_eq!(receipts.len(), 9, "exactly one receipt per event");
    let receipts = mesh.receipts().await.unwrap();
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
    assert_eq!(unregistered.reasons, vec!["unregistered-agent".to_owned()]);
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

    let dead = mesh.wait_messages(subjects::STREAM_DEAD, 8).await.unwrap();
    assert_eq!(dead.len(), 8, "one dead letter per invalid or denied event");
    assert!(
        dead.iter()
            .all(|d| d.headers.get(headers::REASON).is_some())
    );
    assert!(
        dead.iter()
            .any(|d| d.subject.as_str() == "mesh.dead.mallory")
    );
    assert_eq!(mesh.count(subjects::STREAM_DELIVER).await.unwrap(), 1);
}

#[tokio::test]
async fn duplicate_event_id_is_delivered_once() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    for _ in 0..3 {
        mesh.publish_event("mesh.ingress.planner.handoff", &handoff("dup"))
            .await
            .unwrap();
    }
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("marker"))
        .await
        .unwrap();
    mesh.receipt("marker").await.unwrap();
    // The worker has consumed all four ingress messages once it acks them.
    worker_caught_up(&mesh).await;
    assert_eq!(mesh.count(subjects::STREAM_DELIVER).await.unwrap(), 2);
    let receipts = mesh.receipts().await.unwrap();
    assert_eq!(receipts.iter().filter(|r| r.event_id == "dup").count(), 1);
}

/// The consumer `policy-worker` has acked every ingress message.
async fn worker_caught_up(mesh: &Mesh) {
    let consumer_done = || async {
        let mut c = mesh
            .stream(subjects::STREAM_INGRESS)
            .await
            .unwrap()
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("policy-worker")
            .await
            .ok()?;
        let info = c.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    };
    testkit::eventually(WAIT, "the worker to ack every ingress event", consumer_done)
        .await
        .unwrap();
}

#[tokio::test]
async fn two_agents_counting_ids_from_one_each_get_every_receipt_and_delivery() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    // Both agents number their events 1, 2, 3, as hand-written clients do.
    let trace = TraceParent::mint().to_string();
    for n in ["1", "2", "3"] {
        let to_coder = event(n, "planner", "task.handoff")
            .extension("target", "coder")
            .extension("traceparent", trace.clone())
            .data("application/json", serde_json::json!({"task": n}))
            .build()
            .unwrap();
        mesh.publish_event("mesh.ingress.planner.handoff", &to_coder)
            .await
            .unwrap();
        let to_planner = event(n, "coder", "message")
            .extension("target", "planner")
            .extension("traceparent", trace.clone())
            .extension("causationid", n)
            .extension("causationsource", "/agents/planner")
            .data("application/json", serde_json::json!({"text": n}))
            .build()
            .unwrap();
        mesh.publish_event("mesh.ingress.coder.message", &to_planner)
            .await
            .unwrap();
    }
    // The same agent sending the same event again is one event.
    mesh.publish_event(
        "mesh.ingress.planner.handoff",
        &event("1", "planner", "task.handoff")
            .extension("target", "coder")
            .extension("traceparent", trace.clone())
            .data("application/json", serde_json::json!({"task": "1"}))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    worker_caught_up(&mesh).await;

    let receipts = mesh
        .wait_messages(subjects::STREAM_DECISION, 6)
        .await
        .unwrap();
    let mut keys: Vec<String> = receipts
        .iter()
        .map(|m| {
            let r: schemas::DecisionReceipt = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(r.decision, Decision::Allow, "{r:?}");
            assert_eq!(
                header(&m.headers, "Nats-Msg-Id"),
                Some(format!("{}/{}", r.agent, r.event_id))
            );
            format!("{}/{}", r.agent, r.event_id)
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "coder/1",
            "coder/2",
            "coder/3",
            "planner/1",
            "planner/2",
            "planner/3"
        ],
        "exactly one stored receipt per (agent, id)"
    );
    let coders = mesh.receipts().await.unwrap();
    let coder_1 = coders
        .iter()
        .find(|r| r.agent == "coder" && r.event_id == "1")
        .unwrap();
    assert_eq!(coder_1.causation_agent.as_deref(), Some("planner"));

    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 6)
        .await
        .unwrap();
    let mut routes: Vec<String> = delivered
        .iter()
        .map(|d| {
            let id = header(&d.headers, "ce-id").unwrap();
            format!("{} {id}", d.subject)
        })
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            "mesh.deliver.coder.planner 1",
            "mesh.deliver.coder.planner 2",
            "mesh.deliver.coder.planner 3",
            "mesh.deliver.planner.coder 1",
            "mesh.deliver.planner.coder 2",
            "mesh.deliver.planner.coder 3",
        ],
        "exactly one stored delivery per approved (agent, id)"
    );
}

/// Whether `headers` holds `name` in any case.
fn has_header_any_case(headers: &HeaderMap, name: &str) -> bool {
    headers
        .iter()
        .any(|(n, _)| AsRef::<str>::as_ref(n).eq_ignore_ascii_case(name))
}

#[tokio::test]
async fn mesh_headers_sent_by_an_agent_are_dropped_before_delivery_and_dead_letter() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let forged = |headers: &mut HeaderMap| {
        headers.insert("Mesh-Approver", "forged-approver");
        headers.insert("Mesh-Decision", "forged");
        headers.insert("mesh-policy-hash", "forged");
        headers.insert("MESH-DECISION-ID", "forged");
        headers.insert("x-kept", "kept");
    };
    let (mut h, payload) = schemas::encode_binary(&handoff("h-allow"));
    forged(&mut h);
    mesh.publish("mesh.ingress.planner.handoff", h, payload)
        .await
        .unwrap();
    let shell = event("h-deny", "coder", "tool.call")
        .subject("shell.exec")
        .data("application/json", serde_json::json!({"cmd": "id"}))
        .build()
        .unwrap();
    let (mut h, payload) = schemas::encode_binary(&shell);
    forged(&mut h);
    mesh.publish("mesh.ingress.coder.tool_call", h, payload)
        .await
        .unwrap();

    let allowed = mesh.receipt("h-allow").await.unwrap();
    let denied = mesh.receipt("h-deny").await.unwrap();
    assert_eq!(allowed.decision, Decision::Allow);
    assert_eq!(denied.decision, Decision::Deny);

    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 1)
        .await
        .unwrap();
    let dead = mesh.wait_messages(subjects::STREAM_DEAD, 1).await.unwrap();
    for (copy, receipt) in [(&delivered[0], &allowed), (&dead[0], &denied)] {
        let h = &copy.headers;
        for (name, _) in h.iter() {
            let name: &str = name.as_ref();
            let values: Vec<_> = h.get_all(name).map(|v| v.as_str().to_owned()).collect();
            assert!(
                !values.iter().any(|v| v.contains("forged")),
                "{}: `{name}` still carries a forged value: {values:?}",
                copy.subject
            );
        }
        assert!(!has_header_any_case(h, "mesh-approver"), "{}", copy.subject);
        assert_eq!(header(h, "x-kept").as_deref(), Some("kept"));
        assert_eq!(
            h.get_all(headers::POLICY_HASH).count(),
            1,
            "one policy hash, the worker's"
        );
        assert_eq!(
            header(h, headers::POLICY_HASH),
            Some(receipt.policy_hash.clone())
        );
        assert_eq!(
            header(h, headers::DECISION_ID),
            Some(receipt.decision_id.clone())
        );
    }
    // The worker's own decision header (signed with the rest), never the agent's.
    assert_eq!(
        header(&delivered[0].headers, headers::DECISION).as_deref(),
        Some("allow")
    );
    // Its own signature or its batch's: the receipt's either way.
    assert_eq!(
        schemas::signing::Seal::of_headers(Some(&delivered[0].headers)).ok(),
        schemas::signing::Seal::of_receipt(&allowed)
    );
    assert_eq!(
        header(&dead[0].headers, headers::DECISION).as_deref(),
        Some("deny")
    );
}

#[tokio::test]
async fn an_agents_own_nats_headers_never_reach_the_copy() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    // Its own `Nats-Msg-Id` only: the worker's id replaces it on the copy.
    let (mut h, payload) = schemas::encode_binary(&handoff("n-own-id"));
    h.insert("Nats-Msg-Id", "the-agents-own-id");
    mesh.publish("mesh.ingress.planner.handoff", h, payload)
        .await
        .unwrap();
    // With a JetStream expectation that holds on `MESH_INGRESS` and would
    // fail storing the copy on `MESH_DELIVER` if it were forwarded.
    let (mut h, payload) = schemas::encode_binary(&handoff("n-expect"));
    h.insert("Nats-Msg-Id", "another-own-id");
    h.insert("Nats-Expected-Stream", subjects::STREAM_INGRESS);
    mesh.publish("mesh.ingress.planner.handoff", h, payload)
        .await
        .unwrap();

    for id in ["n-own-id", "n-expect"] {
        assert_eq!(mesh.receipt(id).await.unwrap().decision, Decision::Allow);
    }
    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 2)
        .await
        .unwrap();
    let mut ids: Vec<_> = delivered
        .iter()
        .map(|d| header(&d.headers, "Nats-Msg-Id"))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            Some("planner/n-expect".to_owned()),
            Some("planner/n-own-id".to_owned())
        ]
    );
    for d in &delivered {
        assert!(
            !has_header_any_case(&d.headers, "Nats-Expected-Stream"),
            "{:?}",
            d.headers
        );
    }
}

#[tokio::test]
async fn an_unregistered_agent_is_denied_even_when_the_policies_permit_everything() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    // Only a permit-all policy: Cedar alone would allow anyone anything.
    for entry in std::fs::read_dir(policies.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cedar") {
            std::fs::remove_file(path).unwrap();
        }
    }
    std::fs::write(
        policies.path().join("open.cedar"),
        "@id(\"permit-all\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let to_coder = event("from-mallory", "mallory", "task.handoff")
        .extension("target", "coder")
        .build()
        .unwrap();
    mesh.publish_event("mesh.ingress.mallory.handoff", &to_coder)
        .await
        .unwrap();
    mesh.publish_event("mesh.ingress.planner.handoff", &handoff("from-planner"))
        .await
        .unwrap();

    let registered = mesh.receipt("from-planner").await.unwrap();
    assert_eq!(registered.decision, Decision::Allow);
    assert_eq!(registered.reasons, vec!["permit-all".to_owned()]);
    let mallory = mesh.receipt("from-mallory").await.unwrap();
    assert_eq!(mallory.decision, Decision::Deny, "{mallory:?}");
    assert_eq!(mallory.reasons, vec!["unregistered-agent".to_owned()]);
    assert!(
        mallory.errors[0].contains("agent `mallory` is not registered in entities.json"),
        "{:?}",
        mallory.errors
    );
    let dead = mesh.wait_messages(subjects::STREAM_DEAD, 1).await.unwrap();
    assert_eq!(dead[0].subject.as_str(), "mesh.dead.mallory");
    worker_caught_up(&mesh).await;
    let delivered = mesh.messages(subjects::STREAM_DELIVER).await.unwrap();
    assert_eq!(
        delivered.len(),
        1,
        "only the planner's handoff is delivered"
    );
    assert_eq!(delivered[0].subject.as_str(), "mesh.deliver.coder.planner");
}

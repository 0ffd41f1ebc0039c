//! Workflow labels and redaction end to end, against a real nats-server and
//! the real `policy-worker` binary: the exfiltration example
//! (`examples/policies/flows.toml`, `exfiltration.cedar`) denies the last
//! step of a workflow that read a secret and fetched an untrusted page, and
//! allows it in one that did not; a second replica sees the labels the
//! first stored; a purged label record fails closed; a `@redact` permit
//! delivers a redacted, signed copy (JSON and plain text).

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::support;

use std::path::Path;

use schemas::flows::FlowRecord;
use schemas::{Decision, DecisionReceipt, EventBuilder, headers, subjects};
use serde_json::json;
use sha2::Digest;
use support::*;

fn examples(dir: &Path, files: &[&str]) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    for file in files {
        std::fs::copy(from.join(file), dir.join(file)).unwrap();
    }
}

fn traceparent(trace: &str) -> String {
    format!("00-{trace}-00f067aa0ba902b7-01")
}

fn call(id: &str, agent: &str, trace: &str, tool: &str) -> schemas::Event {
    event(id, agent, "tool.call")
        .subject(tool)
        .extension("traceparent", traceparent(trace))
        .data("application/json", json!({"arg": id}))
        .build()
        .unwrap()
}

/// Publishes one tool call and waits for its receipt: the steps of a
/// workflow follow each other.
async fn step(mesh: &Mesh, id: &str, agent: &str, trace: &str, tool: &str) -> DecisionReceipt {
    mesh.publish_event(
        &format!("mesh.ingress.{agent}.tool_call"),
        &call(id, agent, trace, tool),
    )
    .await
    .unwrap();
    mesh.receipt(id).await.unwrap()
}

const SECRET_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4701";
const PLAIN_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4702";
const EXFIL: &str = "no-exfiltration-after-untrusted-input";

#[tokio::test]
async fn a_workflow_that_read_a_secret_and_saw_untrusted_content_cannot_post() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    examples(policies.path(), &["flows.toml", "exfiltration.cedar"]);
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    // Two agents, one workflow: the coder reads, the planner fetches, the
    // coder posts (reviewers call no tools: forbid-reviewers-calling-tools).
    let read = step(&mesh, "s-read", "coder", SECRET_TRACE, "repo.read_secret").await;
    assert_eq!(read.decision, Decision::Allow, "{read:?}");
    assert!(read.labels.is_empty(), "{read:?}");
    assert_eq!(read.labels_added, vec!["private"]);
    let fetch = step(&mesh, "s-fetch", "planner", SECRET_TRACE, "web.fetch").await;
    assert_eq!(fetch.decision, Decision::Allow, "{fetch:?}");
    assert_eq!(fetch.labels, vec!["private"]);
    assert_eq!(fetch.labels_added, vec!["untrusted"]);
    let post = step(&mesh, "s-post", "coder", SECRET_TRACE, "http.post").await;
    assert_eq!(post.decision, Decision::Deny, "{post:?}");
    assert_eq!(post.reasons, vec![EXFIL]);
    assert_eq!(post.labels, vec!["private", "untrusted"]);
    assert!(post.labels_added.is_empty() && !post.labels_lost);

    // The same post in a workflow that never read the secret.
    let fetch = step(&mesh, "p-fetch", "planner", PLAIN_TRACE, "web.fetch").await;
    assert_eq!(fetch.labels_added, vec!["untrusted"]);
    let post = step(&mesh, "p-post", "coder", PLAIN_TRACE, "http.post").await;
    assert_eq!(post.decision, Decision::Allow, "{post:?}");
    assert_eq!(post.labels, vec!["untrusted"]);

    // The record in KV: where each label was picked up, and the allowed steps.
    let kv = mesh.js.get_key_value(subjects::BUCKET_FLOWS).await.unwrap();
    let record: FlowRecord =
        serde_json::from_slice(&kv.get(SECRET_TRACE).await.unwrap().unwrap()).unwrap();
    assert_eq!(record.steps, 2, "the denied post is no step");
    assert_eq!(record.labels["private"].event, "coder/s-read");
    assert_eq!(record.labels["untrusted"].event, "planner/s-fetch");
    assert_eq!(
        record.labels["untrusted"].decision_id,
        mesh.receipt("s-fetch").await.unwrap().decision_id
    );
}

#[tokio::test]
async fn a_second_replica_sees_the_labels_the_first_stored_and_a_purged_record_fails_closed() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    examples(policies.path(), &["flows.toml", "exfiltration.cedar"]);
    let url = mesh.nats.url();
    let mut first = WorkerProcess::start(&url, policies.path(), &[]).await;
    step(&mesh, "r-read", "coder", SECRET_TRACE, "repo.read_secret").await;
    step(&mesh, "r-fetch", "planner", SECRET_TRACE, "web.fetch").await;
    // The replica that stored the labels goes; another decides the rest.
    first.kill();
    let _second = WorkerProcess::start(&url, policies.path(), &[]).await;
    let post = step(&mesh, "r-post", "coder", SECRET_TRACE, "http.post").await;
    assert_eq!(post.decision, Decision::Deny, "{post:?}");
    assert_eq!(post.reasons, vec![EXFIL]);
    assert_eq!(post.labels, vec!["private", "untrusted"]);

    // A workflow whose record is purged (an operator, a mistake): its next
    // external call is denied, never allowed; what no label policy guards
    // goes on.
    step(&mesh, "l-read", "coder", PLAIN_TRACE, "repo.read_secret").await;
    let kv = mesh.js.get_key_value(subjects::BUCKET_FLOWS).await.unwrap();
    kv.purge(PLAIN_TRACE).await.unwrap();
    let post = step(&mesh, "l-post", "coder", PLAIN_TRACE, "http.post").await;
    assert_eq!(post.decision, Decision::Deny, "{post:?}");
    assert_eq!(post.reasons, vec![EXFIL]);
    assert!(post.labels_lost, "{post:?}");
    let search = step(&mesh, "l-search", "coder", PLAIN_TRACE, "code.search").await;
    assert_eq!(search.decision, Decision::Allow, "{search:?}");
    // The record written back stays lost: later steps fail closed too.
    let record: FlowRecord =
        serde_json::from_slice(&kv.get(PLAIN_TRACE).await.unwrap().unwrap()).unwrap();
    assert!(record.lost, "{record:?}");
    let again = step(&mesh, "l-post-2", "coder", PLAIN_TRACE, "http.post").await;
    assert_eq!(again.decision, Decision::Deny, "{again:?}");
}

/// A message from the coder to the reviewer, in binary mode.
fn message(id: &str, content_type: &str, data: &str) -> (async_nats::HeaderMap, bytes::Bytes) {
    let built = event(id, "coder", "message")
        .extension("target", "reviewer")
        .data(content_type, data.to_owned())
        .build()
        .unwrap();
    schemas::encode_binary(&built)
}

#[tokio::test]
async fn a_redact_permit_delivers_a_signed_redacted_copy() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    examples(policies.path(), &["redact.cedar"]);
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let json_data = r#"{"text":"mail bob@example.com","n":1}"#;
    let text_data = "call +44 20 7946 0958 or write to carol@example.org";
    for (id, ct, data) in [
        ("x-json", "application/json", json_data),
        ("x-text", "text/plain", text_data),
        ("x-clean", "text/plain", "looks good to me"),
    ] {
        let (h, p) = message(id, ct, data);
        mesh.publish("mesh.ingress.coder.message", h, p)
            .await
            .unwrap();
    }
    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 3)
        .await
        .unwrap();
    let by_id = |id: &str| {
        delivered
            .iter()
            .find(|m| header(&m.headers, "ce-id").as_deref() == Some(id))
            .unwrap()
    };
    for (id, payload, redacted) in [
        (
            "x-json",
            r#"{"text":"mail [REDACTED:pii.email]","n":1}"#.to_owned(),
            vec!["pii.email"],
        ),
        (
            "x-text",
            "call [REDACTED:pii.phone] or write to [REDACTED:pii.email]".to_owned(),
            vec!["pii.email", "pii.phone"],
        ),
        ("x-clean", "looks good to me".to_owned(), vec![]),
    ] {
        let receipt = mesh.receipt(id).await.unwrap();
        assert_eq!(receipt.decision, Decision::Allow, "{receipt:?}");
        assert_eq!(receipt.redacted, redacted, "{id}");
        let copy = by_id(id);
        assert_eq!(std::str::from_utf8(&copy.payload).unwrap(), payload, "{id}");
        let header_value = header(&copy.headers, headers::REDACTED);
        if redacted.is_empty() {
            assert_eq!(header_value, None, "{id}");
        } else {
            assert_eq!(header_value, Some(redacted.join(",")), "{id}");
        }
        // What is signed is what was delivered.
        assert_eq!(
            receipt.data_sha256,
            hex::encode(sha2::Sha256::digest(&copy.payload)),
            "{id}"
        );
        let seal = schemas::signing::Seal::of_headers(Some(&copy.headers)).unwrap();
        assert_eq!(Some(seal), schemas::signing::Seal::of_receipt(&receipt));
    }
    // The original stays in MESH_INGRESS (which the audit records).
    let ingress = mesh.messages(subjects::STREAM_INGRESS).await.unwrap();
    assert!(
        ingress
            .iter()
            .any(|m| &m.payload[..] == json_data.as_bytes())
    );
}

#[tokio::test]
async fn a_step_that_adds_no_label_writes_nothing_unless_a_policy_counts_steps() {
    const QUIET: &str = "4bf92f3577b34da6a3ce929d0e0e4703";
    const COUNTED: &str = "4bf92f3577b34da6a3ce929d0e0e4704";
    let mesh = Mesh::start().await.unwrap();
    let kv = mesh.js.get_key_value(subjects::BUCKET_FLOWS).await.unwrap();
    let policies = policies_copy();
    examples(policies.path(), &["flows.toml", "exfiltration.cedar"]);
    let mut worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    // Steps that add no label are decided on the record read, never written.
    for id in ["q-1", "q-2"] {
        let r = step(&mesh, id, "coder", QUIET, "code.search").await;
        assert_eq!(r.decision, Decision::Allow, "{r:?}");
    }
    assert!(kv.entry(QUIET).await.unwrap().is_none());
    step(&mesh, "q-read", "coder", QUIET, "repo.read_secret").await;
    let written = kv.entry(QUIET).await.unwrap().unwrap();
    let r = step(&mesh, "q-3", "coder", QUIET, "code.search").await;
    assert_eq!(r.labels, vec!["private"]);
    assert_eq!(
        kv.entry(QUIET).await.unwrap().unwrap().revision,
        written.revision
    );
    worker.kill();

    // A policy that reads `context.workflow.steps`: every allowed step counts.
    std::fs::write(
        policies.path().join("runaway.cedar"),
        "@id(\"no-runaway-workflows\")\nforbid (principal, action, resource) when { context.workflow.steps > 100 };\n",
    )
    .unwrap();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;
    for id in ["c-1", "c-2", "c-3"] {
        let r = step(&mesh, id, "coder", COUNTED, "code.search").await;
        assert_eq!(r.decision, Decision::Allow, "{r:?}");
    }
    let record: FlowRecord =
        serde_json::from_slice(&kv.get(COUNTED).await.unwrap().unwrap()).unwrap();
    assert_eq!(record.steps, 3);
    assert!(record.labels.is_empty());
}

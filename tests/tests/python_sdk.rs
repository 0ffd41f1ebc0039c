//! The Python SDK (`sdk/python`) against the real mesh: this test starts a
//! nats-server with the mesh's streams, the policy worker on the shipped
//! policies and a Rust `coder` (agents-sdk) serving `code.search`, handoffs
//! and messages, then runs the SDK's pytest suite against them, passing the
//! URL through `AGENTMESH_NATS_URL`. A second test does the same on a
//! broker with authorization on, the planner connecting with its nkey.
//!
//! Missing python3, pytest or the package's dependencies fail the test with
//! how to install them (`scripts/install-deps.sh`); it never passes without
//! having run the Python tests.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside `#[test]` fns panic to fail the test, too"
)]

#[path = "sdk_support/mod.rs"]
mod support;

#[path = "python_support/mod.rs"]
mod python_support;

use python_support::{coder, pytest, serve_coder};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_passes_its_tests_against_the_mesh() {
    let mesh = Mesh::with_worker().await;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("notes.txt"),
        "the needle is here\nonly hay\n",
    )
    .unwrap();
    let coder = mesh.agent(coder(root.path().to_path_buf())).await;
    let stop = serve_coder(coder);
    let out = pytest(
        &["test_events.py", "test_sdk.py", "test_a2a.py"],
        vec![("AGENTMESH_NATS_URL", mesh.url())],
    )
    .await;
    stop.cancel();
    let out = out.unwrap();
    println!("{out}");
    for test in [
        "test_the_example_planner_works_with_the_rust_coder",
        "test_send_get_and_cancel_in_a2a_1_0",
        "test_send_get_and_cancel_in_a2a_0_3",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("PASSED") && l.ends_with(test)),
            "{test} did not pass:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_connects_with_an_agents_nkey() {
    let mesh = e2e::SecureNats::start(&["planner", "coder"]).await.unwrap();
    let worker = e2e::start_worker(&mesh).await.unwrap();
    let out = pytest(
        &["test_secure.py"],
        vec![
            ("AGENTMESH_SECURE_NATS_URL", mesh.url()),
            (
                "AGENTMESH_PLANNER_SEED_FILE",
                mesh.seed_file("planner").unwrap().display().to_string(),
            ),
        ],
    )
    .await;
    worker.cancel();
    println!("{}", out.unwrap());
}

/// A handoff from the planner to the reviewer as the policy worker would
/// deliver it, and its receipt (not yet sealed).
fn handoff(
    id: &str,
) -> (
    async_nats::HeaderMap,
    bytes::Bytes,
    schemas::DecisionReceipt,
) {
    use schemas::{Decision, DecisionReceipt, EventBuilder, EventBuilderV10};
    let event = EventBuilderV10::new()
        .id(id)
        .source("/agents/planner")
        .ty("io.agentmesh.task.handoff")
        .extension("target", "reviewer")
        .data("application/json", serde_json::json!({"task": "review"}))
        .build()
        .unwrap();
    let (h, payload) = schemas::encode_binary(&event);
    let receipt = DecisionReceipt {
        event_id: id.into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        decision: Decision::Allow,
        policy_hash: "b47752a7c0d0e810".into(),
        decision_id: format!("d-{id}"),
        agent: "planner".into(),
        event_type: "io.agentmesh.task.handoff".into(),
        target: Some("reviewer".into()),
        decided_at: "2026-12-02T00:00:00.000001Z".into(),
        data_sha256: schemas::signing::sha256_hex(&payload),
        ..Default::default()
    };
    (h, payload, receipt)
}

/// Stamps a sealed `receipt` on `h` and stores the delivery.
async fn deliver(
    mesh: &Mesh,
    mut h: async_nats::HeaderMap,
    receipt: &schemas::DecisionReceipt,
    payload: bytes::Bytes,
) {
    use schemas::headers;
    h.insert(headers::DECISION_ID, receipt.decision_id.as_str());
    h.insert(headers::POLICY_HASH, receipt.policy_hash.as_str());
    h.insert(headers::TRACE_ID, receipt.trace_id.as_str());
    schemas::signing::SigningKey::stamp(receipt, &mut h);
    mesh.js
        .publish_with_headers("mesh.deliver.reviewer.planner", h, payload)
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Publishes a handoff from the planner to the reviewer on
/// `mesh.deliver.reviewer.planner` as the policy worker would: signed by
/// `key` (when given), its payload then replaced by `tampered` (when given).
async fn signed_delivery(
    mesh: &Mesh,
    id: &str,
    key: Option<&schemas::signing::SigningKey>,
    tampered: Option<&str>,
) {
    let (h, payload, mut receipt) = handoff(id);
    if let Some(key) = key {
        key.seal_digest(&mut receipt);
    }
    let payload = tampered.map_or(payload, |t| t.to_owned().into());
    if key.is_some() {
        deliver(mesh, h, &receipt, payload).await;
    } else {
        mesh.js
            .publish_with_headers("mesh.deliver.reviewer.planner", h, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Publishes handoffs `ids` signed together by `key` as a worker under load
/// does: one signed Merkle root, an inclusion proof each (`Mesh-Batch-*`).
/// The delivery `altered` gets another payload, `swapped` another's proof.
async fn batch_signed_deliveries(
    mesh: &Mesh,
    key: &schemas::signing::SigningKey,
    ids: &[&str],
    altered: &str,
    swapped: &str,
) {
    let mut handoffs: Vec<_> = ids.iter().map(|id| handoff(id)).collect();
    let bytes: Vec<Vec<u8>> = handoffs
        .iter_mut()
        .map(|(_, _, r)| {
            r.signer = key.public_key().to_owned();
            schemas::signing::SignedFields::of_receipt(r).bytes()
        })
        .collect();
    let seals = key.seal_batch(&bytes).unwrap();
    for ((_, _, r), seal) in handoffs.iter_mut().zip(seals) {
        seal.write(r);
    }
    let proofs: Vec<String> = handoffs
        .iter()
        .map(|(_, _, r)| r.batch_proof.clone())
        .collect();
    for (i, (h, payload, mut receipt)) in handoffs.into_iter().enumerate() {
        let mut payload = payload;
        if receipt.event_id == altered {
            payload = bytes::Bytes::from_static(b"{\"task\":\"rm -rf /\"}");
        }
        if receipt.event_id == swapped {
            receipt.batch_proof = proofs[(i + 1) % proofs.len()].clone();
        }
        deliver(mesh, h, &receipt, payload).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_verifies_signed_deliveries() {
    use schemas::signing::{SignerRecord, SignerStatus, SigningKey};
    let mesh = Mesh::start().await;
    // `mesh-signers` is one of broker-config's buckets (applied at start).
    let signers = mesh
        .js
        .get_key_value(schemas::subjects::BUCKET_SIGNERS)
        .await
        .unwrap();
    let worker = SigningKey::generate();
    let record = SignerRecord {
        public_key: worker.public_key().to_owned(),
        name: "policy-worker".into(),
        status: SignerStatus::Active,
        added_at: "2026-12-01T00:00:00Z".into(),
        retired_at: String::new(),
        revoked_at: String::new(),
    };
    signers
        .put(
            worker.public_key(),
            serde_json::to_vec(&record).unwrap().into(),
        )
        .await
        .unwrap();
    let stranger = SigningKey::generate();
    signed_delivery(&mesh, "signed", Some(&worker), None).await;
    signed_delivery(
        &mesh,
        "altered",
        Some(&worker),
        Some("{\"task\":\"rm -rf /\"}"),
    )
    .await;
    signed_delivery(&mesh, "unsigned", None, None).await;
    signed_delivery(&mesh, "stranger", Some(&stranger), None).await;
    batch_signed_deliveries(
        &mesh,
        &worker,
        &[
            "batched-1",
            "batched-2",
            "batched-altered",
            "batched-swapped",
        ],
        "batched-altered",
        "batched-swapped",
    )
    .await;
    let out = pytest(
        &["test_signing.py"],
        vec![
            ("AGENTMESH_SIGNED_NATS_URL", mesh.url()),
            ("AGENTMESH_SIGNED_GOOD", "signed,batched-1,batched-2".into()),
            (
                "AGENTMESH_SIGNED_REFUSED",
                "altered,unsigned,stranger,batched-altered,batched-swapped".into(),
            ),
        ],
    )
    .await
    .unwrap();
    println!("{out}");
}

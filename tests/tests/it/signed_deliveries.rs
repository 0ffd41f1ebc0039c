//! Signed decisions end to end (`docs/contract.md`, "Signed decisions"):
//! agents-sdk refuses forged and altered deliveries before any handler
//! runs (changed data, a dead letter turned into a delivery, a signer that
//! is not trusted, a revoked signer) and acknowledges them; a plain Python
//! client verifies a real delivery; after a signer is rotated, what the
//! retired key signed still verifies and the new key's receipts do too.

// Test helpers: a panic is how a test fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is how a test fails"
)]

use crate::sdk_support;

use std::path::Path;
use std::sync::Arc;

use agents_sdk::Agent;
use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use futures::StreamExt;
use schemas::signing::{Refused, Seal, SignerRecord, SignerStatus, Signers, SigningKey};
use schemas::{Decision, DecisionReceipt, headers, subjects};
use sdk_support::{Mesh, WAIT};
use testkit::eventually;

/// The stored copy on `subject` whose `ce-id` is `id`.
async fn stored(mesh: &Mesh, stream: &str, subject: &str, id: &str) -> StreamMessage {
    eventually(WAIT, &format!("`{id}` on `{subject}`"), || async move {
        mesh.messages_on(stream, subject)
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.headers.get("ce-id").is_some_and(|v| v.as_str() == id))
    })
    .await
    .unwrap()
}

/// `headers` with a fresh `Nats-Msg-Id` (so the stream keeps the copy).
fn renamed(headers: &HeaderMap, msg_id: &str) -> HeaderMap {
    let mut h = headers.clone();
    h.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    h
}

/// `headers` signed by `key` over `receipt`'s fields instead.
fn resigned(headers: &HeaderMap, receipt: &DecisionReceipt, key: &SigningKey) -> HeaderMap {
    let mut r = receipt.clone();
    key.seal_digest(&mut r);
    let mut h = headers.clone();
    SigningKey::stamp(&r, &mut h);
    h
}

async fn put_signer(mesh: &Mesh, key: &SigningKey, status: SignerStatus, retired_at: &str) {
    let kv = mesh
        .js
        .get_key_value(subjects::BUCKET_SIGNERS)
        .await
        .unwrap();
    let record = SignerRecord {
        public_key: key.public_key().to_owned(),
        name: "test".into(),
        status,
        added_at: "2026-01-01T00:00:00Z".into(),
        retired_at: retired_at.to_owned(),
        revoked_at: String::new(),
    };
    kv.put(
        key.public_key(),
        serde_json::to_vec(&record).unwrap().into(),
    )
    .await
    .unwrap();
}

async fn signers(mesh: &Mesh) -> Signers {
    let kv = mesh
        .js
        .get_key_value(subjects::BUCKET_SIGNERS)
        .await
        .unwrap();
    let mut keys = kv.keys().await.unwrap().boxed();
    let mut records = Vec::new();
    while let Some(key) = keys.next().await {
        let value = kv.get(key.unwrap()).await.unwrap().unwrap();
        records.push(serde_json::from_slice::<SignerRecord>(&value).unwrap());
    }
    Signers::new(records)
}

fn python_verify(mesh: &Mesh, seq: u64) -> (bool, String) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/verify_delivery.py");
    let out = std::process::Command::new(testkit::python())
        .arg(script)
        .args(["--nats-url", &mesh.url(), "--seq", &seq.to_string()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn forged_and_altered_deliveries_never_reach_the_handler() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let deliver = subjects::deliver("coder", "planner");

    // A genuine delivery, and a handoff denied for carrying a secret (its
    // dead letter names the coder as target).
    let genuine = planner
        .workflow()
        .handoff("coder", "write the parser test")
        .await
        .unwrap();
    let denied = planner
        .workflow()
        .handoff("coder", "deploy with AKIAIOSFODNN7EXAMPLE")
        .await
        .unwrap();
    let real = stored(&mesh, subjects::STREAM_DELIVER, &deliver, &genuine.id).await;
    let dead = stored(
        &mesh,
        subjects::STREAM_DEAD,
        "mesh.dead.planner",
        &denied.id,
    )
    .await;
    assert_eq!(
        dead.headers.get(headers::DECISION).map(|v| v.as_str()),
        Some("deny")
    );
    assert!(Seal::of_headers(Some(&dead.headers)).is_ok());
    let receipt = mesh.receipt(&genuine.id).await.unwrap();
    assert_eq!(receipt.decision, Decision::Allow);
    // Signed alone, or in a batch with the denied handoff: either way the
    // receipt's seal.
    assert_eq!(
        Seal::of_headers(Some(&real.headers)).ok(),
        Seal::of_receipt(&receipt),
        "the delivery carries the receipt's signature"
    );

    // The forgeries, published where only the worker may publish (this
    // test's connection is the operator's).
    let outsider = SigningKey::generate();
    let revoked = SigningKey::generate();
    put_signer(&mesh, &revoked, SignerStatus::Revoked, "").await;
    let mut turned = renamed(&dead.headers, "forged-decision");
    turned.insert(headers::DECISION, "allow");
    let forgeries: Vec<(&str, HeaderMap, bytes::Bytes)> = vec![
        (
            "changed data",
            renamed(&real.headers, "forged-data"),
            bytes::Bytes::from_static(b"{\"task\":\"rm -rf /\"}"),
        ),
        ("decision header changed", turned, dead.payload.clone()),
        (
            "signed by a key not in mesh-signers",
            renamed(
                &resigned(&real.headers, &receipt, &outsider),
                "forged-outsider",
            ),
            real.payload.clone(),
        ),
        (
            "signed by a revoked key",
            renamed(
                &resigned(&real.headers, &receipt, &revoked),
                "forged-revoked",
            ),
            real.payload.clone(),
        ),
    ];
    let mut forged_seqs = Vec::new();
    for (_, h, payload) in &forgeries {
        let ack = mesh
            .js
            .publish_with_headers(deliver.clone(), h.clone(), payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        forged_seqs.push(ack.sequence);
    }

    // A Python client verifies the real delivery and refuses the altered one.
    let (ok, out) = python_verify(&mesh, real.sequence);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("verified {}", genuine.id)), "{out}");
    let (ok, out) = python_verify(&mesh, forged_seqs[0]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("refused: signature does not match")
            || out.contains("refused: inclusion proof does not lead to the signed root"),
        "{out}"
    );

    // The coder's handler sees the genuine delivery only.
    let coder = mesh.agent(Agent::builder("coder")).await;
    let (seen, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let mut deliveries = coder.deliveries().await.unwrap();
    let reader = tokio::spawn(async move {
        while let Some(d) = deliveries.next().await {
            let d = d.unwrap();
            d.ack().await.unwrap();
            let _ = seen.send(d.id().to_owned());
        }
    });
    let first = tokio::time::timeout(WAIT, handled.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, genuine.id);
    eventually(WAIT, "four refused deliveries", || async {
        (coder.metrics().refused == 4).then_some(())
    })
    .await
    .unwrap();
    // Refused ones are acknowledged: nothing left to deliver again.
    eventually(WAIT, "the coder's durable to be empty", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
    assert!(
        handled.try_recv().is_err(),
        "a forged delivery reached the handler"
    );
    let m = coder.metrics();
    assert_eq!((m.refused, m.invalid, m.handled), (4, 0, 0), "{m:?}");
    reader.abort();

    // Verification off (an explicit choice): the forgery is handed over.
    let trusting = mesh
        .agent(Agent::builder("reviewer").verify_deliveries(false))
        .await;
    let mut h = renamed(&real.headers, "forged-for-reviewer");
    h.insert("ce-target", "reviewer");
    mesh.js
        .publish_with_headers(
            subjects::deliver("reviewer", "planner"),
            h,
            bytes::Bytes::from_static(b"{\"task\":\"anything\"}"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut theirs = trusting.deliveries().await.unwrap();
    let got = tokio::time::timeout(WAIT, theirs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.id(), genuine.id);
    assert_eq!(trusting.metrics().refused, 0);
}

#[tokio::test]
async fn a_rotated_signer_still_verifies_what_it_signed() {
    let mut mesh = Mesh::start().await;
    let old = Arc::new(SigningKey::generate());
    let new = Arc::new(SigningKey::generate());
    put_signer(&mesh, &old, SignerStatus::Active, "").await;
    mesh.start_worker(Some(old.clone())).await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let before = planner
        .workflow()
        .handoff("coder", "before the rotation")
        .await
        .unwrap();
    let r1 = mesh.receipt(&before.id).await.unwrap();
    assert_eq!(r1.signer, old.public_key());

    // Rotate: the new key in, the old one retired as of now; the worker
    // restarts with the new key.
    put_signer(&mesh, &new, SignerStatus::Active, "").await;
    let retired_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    put_signer(&mesh, &old, SignerStatus::Retired, &retired_at).await;
    mesh.stop_worker().await;
    mesh.start_worker(Some(new.clone())).await;
    let after = planner
        .workflow()
        .handoff("coder", "after the rotation")
        .await
        .unwrap();
    let r2 = mesh.receipt(&after.id).await.unwrap();
    assert_eq!(r2.signer, new.public_key());

    let trusted = signers(&mesh).await;
    assert_eq!(
        trusted.verify_receipt(&r1),
        Ok(()),
        "old receipt, retired key"
    );
    assert_eq!(trusted.verify_receipt(&r2), Ok(()), "new receipt, new key");
    // The retired key cannot sign anything dated after its retirement.
    let mut late = r2.clone();
    old.seal_digest(&mut late);
    assert!(
        matches!(trusted.verify_receipt(&late), Err(Refused::Retired { .. })),
        "{:?}",
        trusted.verify_receipt(&late)
    );

    // Both deliveries reach the coder: the one signed before the rotation
    // with the retired key, the other with the new key.
    let coder = mesh.agent(Agent::builder("coder")).await;
    let mut deliveries = coder.deliveries().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(WAIT, deliveries.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ids.push(d.id().to_owned());
        d.ack().await.unwrap();
    }
    ids.sort();
    let mut want = vec![before.id.clone(), after.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(coder.metrics().refused, 0);
}

/// The batch size a `Mesh-Batch-Proof` names (`<index>.<size>.<path>`).
fn batch_size(m: &StreamMessage) -> u64 {
    m.headers
        .get(headers::BATCH_PROOF)
        .and_then(|p| p.as_str().split('.').nth(1)?.parse().ok())
        .unwrap_or(1)
}

#[tokio::test]
async fn a_burst_is_signed_in_batches_and_every_delivery_still_verifies() {
    const BURST: usize = 200;
    let mut mesh = Mesh::start().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let mut ids = Vec::new();
    for i in 0..BURST {
        let sent = planner
            .workflow()
            .handoff("coder", format!("task {i}"))
            .await
            .unwrap();
        ids.push(sent.id);
    }
    // The worker starts on the backlog: many decisions are ready at once,
    // so the signer takes them together (the default batch size, 256).
    mesh.start_worker(None).await;
    let deliver = subjects::deliver("coder", "planner");
    let copies = eventually(WAIT, "every delivery of the burst", || {
        let (mesh, deliver) = (&mesh, &deliver);
        async move {
            let copies = mesh
                .messages_on(subjects::STREAM_DELIVER, deliver)
                .await
                .unwrap();
            (copies.len() == BURST).then_some(copies)
        }
    })
    .await
    .unwrap();
    let largest = copies.iter().map(batch_size).max().unwrap_or(0);
    assert!(
        largest > 1,
        "no delivery of a {BURST}-event backlog was signed in a batch"
    );
    let batched = copies
        .iter()
        .find(|m| batch_size(m) == largest)
        .unwrap()
        .clone();
    let other = copies
        .iter()
        .find(|m| {
            batch_size(m) == largest
                && m.headers.get(headers::BATCH_PROOF) != batched.headers.get(headers::BATCH_PROOF)
                && m.headers.get(headers::BATCH_ROOT) == batched.headers.get(headers::BATCH_ROOT)
        })
        .unwrap()
        .clone();
    let id = batched.headers.get("ce-id").unwrap().as_str().to_owned();
    assert!(batched.headers.get(headers::SIGNATURE).is_none());

    // The receipt carries the same root, proof and signature, and verifies
    // as the auditor checks it (every receipt of the burst does).
    let receipt = mesh.receipt(&id).await.unwrap();
    assert!(receipt.signature.is_empty() && !receipt.batch_signature.is_empty());
    assert_eq!(
        Seal::of_headers(Some(&batched.headers)).ok(),
        Seal::of_receipt(&receipt)
    );
    let trusted = signers(&mesh).await;
    let roots = schemas::signing::VerifiedRoots::default();
    let receipts: Vec<DecisionReceipt> = mesh
        .messages(subjects::STREAM_DECISION)
        .await
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(receipts.len(), BURST);
    for r in &receipts {
        assert_eq!(
            trusted.verify_receipt_cached(r, Some(&roots)),
            Ok(()),
            "{r:?}"
        );
    }
    assert!(
        roots.len() < BURST,
        "{} roots for {BURST} receipts",
        roots.len()
    );

    // Forgeries of a batched delivery: its data changed, another decision's
    // proof in its place.
    let mut swapped = renamed(&batched.headers, "forged-proof");
    swapped.insert(
        headers::BATCH_PROOF,
        other.headers.get(headers::BATCH_PROOF).unwrap().as_str(),
    );
    let mut forged_seqs = Vec::new();
    for (h, payload) in [
        (
            renamed(&batched.headers, "forged-batched-data"),
            bytes::Bytes::from_static(b"{\"task\":\"rm -rf /\"}"),
        ),
        (swapped, batched.payload.clone()),
    ] {
        let ack = mesh
            .js
            .publish_with_headers(deliver.clone(), h, payload)
            .await
            .unwrap()
            .await
            .unwrap();
        forged_seqs.push(ack.sequence);
    }

    // A plain Python client verifies the batched delivery and refuses both.
    let (ok, out) = python_verify(&mesh, batched.sequence);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("verified {id}")), "{out}");
    for seq in forged_seqs {
        let (ok, out) = python_verify(&mesh, seq);
        assert!(!ok, "{out}");
        assert!(
            out.contains("refused: inclusion proof does not lead to the signed root"),
            "{out}"
        );
    }

    // The coder's handler gets the whole burst and neither forgery.
    let coder = mesh.agent(Agent::builder("coder")).await;
    let mut deliveries = coder.deliveries().await.unwrap();
    let (seen, mut read) = tokio::sync::mpsc::unbounded_channel();
    // Reads on (a refusal happens as the stream reaches the forgery).
    let reader = tokio::spawn(async move {
        while let Some(d) = deliveries.next().await {
            let d = d.unwrap();
            d.ack().await.unwrap();
            let _ = seen.send(d.id().to_owned());
        }
    });
    let mut handled = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while handled.len() < BURST {
        let id = tokio::time::timeout_at(deadline, read.recv())
            .await
            .expect("the burst to be handled")
            .unwrap();
        handled.insert(id);
    }
    eventually(WAIT, "two refused deliveries", || async {
        (coder.metrics().refused == 2).then_some(())
    })
    .await
    .unwrap();
    eventually(WAIT, "the coder's durable to be empty", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(handled, ids.into_iter().collect());
    assert!(
        read.try_recv().is_err(),
        "a forged delivery reached the reader"
    );
    let m = coder.metrics();
    assert_eq!((m.refused, m.handled), (2, 0), "{m:?}");
    reader.abort();
}

#[tokio::test]
async fn a_redacted_delivery_verifies_in_the_rust_sdk_and_in_python() {
    // The shipped policies plus the redaction example: messages to
    // reviewers are delivered with personal data replaced.
    let policies = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(sdk_support::shipped_policies()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, policies.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/redact.cedar");
    std::fs::copy(example, policies.path().join("redact.cedar")).unwrap();
    let mut mesh = Mesh::start().await;
    mesh.start_worker_on(policies.path().to_owned(), None).await;

    let coder = mesh.agent(Agent::builder("coder")).await;
    let sent = coder
        .workflow()
        .message(
            "reviewer",
            serde_json::json!({"note": "ask bob@example.com for the keys"}),
        )
        .await
        .unwrap();
    let copy = stored(
        &mesh,
        subjects::STREAM_DELIVER,
        &subjects::deliver("reviewer", "coder"),
        &sent.id,
    )
    .await;
    assert_eq!(
        copy.headers.get(headers::REDACTED).map(|v| v.as_str()),
        Some("pii.email")
    );
    let receipt = mesh.receipt(&sent.id).await.unwrap();
    assert_eq!(receipt.redacted, vec!["pii.email"]);

    // A Python client verifies the redacted copy against mesh-signers.
    let (ok, out) = python_verify(&mesh, copy.sequence);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("verified {}", sent.id)), "{out}");

    // The reviewer's agents-sdk verifies it and hands it over, redacted.
    let reviewer = mesh.agent(Agent::builder("reviewer")).await;
    let mut deliveries = reviewer.deliveries().await.unwrap();
    let got = tokio::time::timeout(WAIT, deliveries.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    got.ack().await.unwrap();
    assert_eq!(got.id(), sent.id);
    let data: serde_json::Value = got.json().unwrap();
    assert_eq!(
        data["body"]["note"], "ask [REDACTED:pii.email] for the keys",
        "{data}"
    );
    assert_eq!(reviewer.metrics().refused, 0);
}

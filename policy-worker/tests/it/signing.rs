//! The signer's collection window (`--sign-window-us`) against the real
//! binary: a lone event is not held back waiting for company.

use std::time::{Duration, Instant};

use crate::support;

use schemas::{Decision, subjects};
use support::*;

#[tokio::test]
async fn a_lone_event_is_signed_and_delivered_within_the_window() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    // A window far above the worker's own time per event: were the lone
    // decision held until a batch filled, it would never come.
    let window = Duration::from_millis(300);
    let _worker = WorkerProcess::start(
        &mesh.nats.url(),
        policies.path(),
        &["--sign-window-us", &window.as_micros().to_string()],
    )
    .await;

    let (h, payload) = schemas::encode_binary(&handoff("lone-1"));
    let sent = Instant::now();
    mesh.publish("mesh.ingress.planner.handoff", h, payload)
        .await
        .unwrap();
    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 1)
        .await
        .unwrap();
    let took = sent.elapsed();
    // The window and the worker's own work; generous for a busy machine.
    assert!(
        took >= window && took < window + Duration::from_secs(3),
        "a lone event was delivered {took:?} after publishing with a {window:?} window"
    );
    let receipt = mesh.receipt("lone-1").await.unwrap();
    assert_eq!(receipt.decision, Decision::Allow);
    // Signed alone, and the delivery carries the receipt's signature.
    assert!(
        !receipt.signature.is_empty() && receipt.batch_signature.is_empty(),
        "{receipt:?}"
    );
    assert_eq!(
        schemas::signing::Seal::of_headers(Some(&delivered[0].headers)).ok(),
        schemas::signing::Seal::of_receipt(&receipt)
    );
}

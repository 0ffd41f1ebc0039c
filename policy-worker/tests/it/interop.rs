//! Interop: an independent client (Python `nats-py`, the README's example
//! script) publishes a binary-mode event and sees the receipt and delivery.
//! Needs Python with `nats-py`: `testkit::python()`, the venv
//! `scripts/install-deps.sh` makes (`scripts/test.sh` runs it), or
//! `AGENTMESH_PYTHON`.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::support;

use std::process::Command;

use schemas::subjects;
use support::*;

fn python() -> String {
    testkit::python()
}

fn run_example(nats_url: &str, extra: &[&str]) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/publish_event.py"
    );
    let probe = Command::new(python()).args(["-c", "import nats"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "this test needs python3 with nats-py: run `scripts/install-deps.sh` (into .agentmesh/venv; scripts/test.sh does) or set AGENTMESH_PYTHON"
    );
    let out = Command::new(python())
        .arg(script)
        .args(["--nats-url", nats_url])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn nats_py_client_publishes_and_sees_receipt_and_delivery() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    let url = mesh.nats.url();
    let out = tokio::task::spawn_blocking(move || run_example(&url, &[]))
        .await
        .unwrap();
    assert!(out.contains("\"decision\": \"allow\""), "{out}");
    assert!(
        out.contains("delivered: mesh.deliver.coder.planner {\"task\": \"implement the parser\"}"),
        "{out}"
    );

    // The percent-encoded subject written by Python decodes to the original.
    let delivered = mesh
        .wait_messages(subjects::STREAM_DELIVER, 1)
        .await
        .unwrap();
    let (event, _) = schemas::decode(Some(&delivered[0].headers), &delivered[0].payload).unwrap();
    assert_eq!(
        schemas::AttributesReader::subject(&event),
        Some("Implement the parser — “fast”")
    );

    let url = mesh.nats.url();
    let out = tokio::task::spawn_blocking(move || run_example(&url, &["--tool", "shell.exec"]))
        .await
        .unwrap();
    assert!(out.contains("\"decision\": \"deny\""), "{out}");
    assert!(out.contains("forbid-shell-exec"), "{out}");
    assert!(!out.contains("delivered:"), "{out}");
}

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

// Test helpers outside `#[test]` fns panic to fail the test, too.

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

//! The Python SDK (`sdk/python`) against the real mesh: this test starts a
//! nats-server with the mesh's streams, the policy worker on the shipped
//! policies and a Rust `coder` (agents-sdk) serving `code.search`, handoffs
//! and messages, then runs the SDK's pytest suite against them, passing the
//! URL through `AGENTMESH_NATS_URL`. A second test does the same on a
//! broker with authorization on, the planner connecting with its nkey.
//!
//! `the_python_sdk_verifies_a_redacted_delivery_and_refuses_it_unredacted`
//! runs `test_redacted.py` on copies the worker redacted (JSON and plain
//! text) and on one put back to its original after signing.
//!
//! `the_readmes_python_pair_runs_as_printed` runs the README's Python pair
//! (the blocks marked `<!-- readme-test: NAME -->`, read from README.md)
//! as a reader would after `./scripts/demo.sh`, authorization on.
//!
//! Missing python3, pytest or the package's dependencies fail the test with
//! how to install them (`scripts/install-deps.sh`); it never passes without
//! having run the Python tests.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside `#[test]` fns panic to fail the test, too"
)]

use crate::sdk_support as support;

use crate::python_support;

use std::path::Path;

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
    // The A2A tests apart: they need a2a-sdk (Python 3.10+), the rest not.
    let sdk = pytest(
        &[
            "test_events.py",
            "test_connect.py",
            "test_packaging.py",
            "test_sdk.py",
        ],
        vec![("AGENTMESH_NATS_URL", mesh.url())],
    )
    .await;
    let a2a = match &sdk {
        Ok(_) => Some(pytest(&["test_a2a.py"], vec![("AGENTMESH_NATS_URL", mesh.url())]).await),
        Err(_) => None,
    };
    stop.cancel();
    let mut out = sdk.unwrap();
    println!("{out}");
    out.push_str(&a2a.unwrap().unwrap());
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

/// The code blocks of `README.md` marked `<!-- readme-test: NAME -->` (the
/// fenced block right after the marker), by name.
fn readme_blocks() -> std::collections::BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut blocks = std::collections::BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- readme-test:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "README.md: the marker of `{}` is not followed by a code block",
            name.trim()
        );
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        blocks.insert(name.trim().to_owned(), body.join("\n") + "\n");
    }
    blocks
}

/// Lines a child process printed, collected as they come.
#[derive(Clone, Default)]
struct Printed(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Printed {
    fn follow(&self, out: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn has(&self, line: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l == line)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// A directory laid out as the repository after `./scripts/demo.sh`: the
/// agents' keys in `.agentmesh/auth/agents/`, `.agentmesh/venv/bin/python`
/// (the test's interpreter, importing the SDK of this work tree) and a
/// Markdown file for `code.search` to find.
fn demo_tree(mesh: &e2e::SecureNats, agents: &[&str]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().unwrap();
    let keys = root.path().join(".agentmesh/auth/agents");
    std::fs::create_dir_all(&keys).unwrap();
    for agent in agents {
        std::fs::copy(
            mesh.seed_file(agent).unwrap(),
            keys.join(format!("{agent}.nk")),
        )
        .unwrap();
    }
    let bin = root.path().join(".agentmesh/venv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let python = bin.join("python");
    std::fs::write(
        &python,
        format!(
            "#!/bin/sh\nPYTHONPATH='{}' exec '{}' \"$@\"\n",
            python_support::sdk_dir().display(),
            python_support::python()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
        root.path().join("README.md"),
    )
    .unwrap();
    root
}

/// `bash -c <script>` in `dir` against the broker at `url`, in a process
/// group of its own (see [`kill_group`]).
fn bash(script: &str, dir: &Path, url: &str) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    let mut command = std::process::Command::new("bash");
    command
        .args(["-c", script])
        .current_dir(dir)
        .env("NATS_URL", url)
        .env_remove("AGENTMESH_NKEY_FILE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    command
}

/// Kills `child` and what it started (its process group).
fn kill_group(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_python_pair_runs_as_printed() {
    python_support::require("nats, nkeys").unwrap();
    let blocks = readme_blocks();
    let block = |name: &str| {
        blocks
            .get(name)
            .unwrap_or_else(|| panic!("README.md has no block marked `readme-test: {name}`"))
            .clone()
    };
    let mesh = e2e::SecureNats::start(&["planner", "coder"]).await.unwrap();
    let worker = e2e::start_worker(&mesh).await.unwrap();
    let root = demo_tree(&mesh, &["planner", "coder"]);
    for name in ["coder.py", "planner.py"] {
        std::fs::write(root.path().join(name), block(name)).unwrap();
    }

    let mut coder = bash(&block("coder.sh"), root.path(), &mesh.url())
        .spawn()
        .unwrap();
    let (coder_out, coder_err) = (Printed::default(), Printed::default());
    coder_out.follow(coder.stdout.take().unwrap());
    coder_err.follow(coder.stderr.take().unwrap());
    let ready = testkit::eventually(e2e::WAIT, "the README's coder to serve", || {
        let (out, exited) = (coder_out.clone(), coder.try_wait().ok().flatten());
        async move { (out.has("coder serves code.search") || exited.is_some()).then_some(()) }
    })
    .await;
    assert!(
        ready.is_ok() && coder_out.has("coder serves code.search"),
        "the README's coder did not start serving:\n{}\n{}",
        coder_out.text(),
        coder_err.text()
    );

    let script = block("planner.sh");
    let (dir, url) = (root.path().to_owned(), mesh.url());
    let planner = tokio::time::timeout(
        e2e::WAIT,
        tokio::task::spawn_blocking(move || bash(&script, &dir, &url).output()),
    )
    .await;
    let handed_off = testkit::eventually(e2e::WAIT, "the coder to get the handoff", || {
        let out = coder_out.clone();
        async move { out.has("task.handoff from planner").then_some(()) }
    })
    .await;
    kill_group(&mut coder);
    worker.cancel();
    let planner = planner
        .expect("the README's planner did not finish within WAIT")
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&planner.stdout);
    let err = String::from_utf8_lossy(&planner.stderr);
    println!("planner:\n{out}{err}\ncoder:\n{}", coder_out.text());
    assert!(
        planner.status.success(),
        "the README's planner failed:\n{out}{err}"
    );
    let lines: Vec<&str> = out.lines().collect();
    let found = lines
        .iter()
        .find_map(|l| l.strip_prefix("code.search: "))
        .and_then(|rest| rest.strip_suffix(" lines"))
        .and_then(|n| n.parse::<u32>().ok());
    assert!(found.is_some_and(|n| n > 0), "no lines found:\n{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("shell.exec denied by [") && l.contains("'forbid-shell-exec'")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("prompt: allow - meshctl trace ")),
        "{out}"
    );
    handed_off.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_verifies_a_redacted_delivery_and_refuses_it_unredacted() {
    use schemas::{EventBuilder, EventBuilderV10, headers, subjects};
    use testkit::eventually;
    // The shipped policies plus the redaction example.
    let policies = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped_policies()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, policies.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/redact.cedar");
    std::fs::copy(example, policies.path().join("redact.cedar")).unwrap();
    let mut mesh = Mesh::start().await;
    mesh.start_worker_on(policies.path().to_owned(), None).await;

    // JSON through the Rust SDK, plain text as a raw event.
    let coder = mesh.agent(agents_sdk::Agent::builder("coder")).await;
    let json_id = coder
        .workflow()
        .message(
            "reviewer",
            serde_json::json!({"note": "ask bob@example.com for the keys"}),
        )
        .await
        .unwrap()
        .id;
    let text = EventBuilderV10::new()
        .id("redacted-text")
        .source("/agents/coder")
        .ty("io.agentmesh.message")
        .extension("target", "reviewer")
        .data(
            "text/plain",
            "call +44 20 7946 0958 or write to carol@example.org".to_owned(),
        )
        .build()
        .unwrap();
    mesh.publish_event(&subjects::ingress("coder", "message"), &text)
        .await
        .unwrap();

    let deliver = subjects::deliver("reviewer", "coder");
    let copies = eventually(WAIT, "both redacted copies", || async {
        let stored = mesh
            .messages_on(subjects::STREAM_DELIVER, &deliver)
            .await
            .ok()?;
        (stored.len() == 2).then_some(stored)
    })
    .await
    .unwrap();
    let mut expect = serde_json::Map::new();
    let mut original = None;
    for copy in &copies {
        let id = copy.headers.get("ce-id").unwrap().as_str().to_owned();
        let data = String::from_utf8(copy.payload.to_vec()).unwrap();
        let kinds = copy
            .headers
            .get(headers::REDACTED)
            .unwrap()
            .as_str()
            .to_owned();
        assert!(!data.contains("example."), "{id}: {data}");
        if id == json_id {
            assert_eq!(kinds, "pii.email");
            // The attack: the same signed copy with the address put back.
            let unredacted = data.replace("[REDACTED:pii.email]", "bob@example.com");
            assert_ne!(unredacted, data);
            original = Some((copy.headers.clone(), unredacted));
        } else {
            assert_eq!(id, "redacted-text");
            assert_eq!(kinds, "pii.email,pii.phone");
        }
        expect.insert(id, serde_json::json!([data, kinds]));
    }
    let (mut h, unredacted) = original.unwrap();
    h.insert(async_nats::header::NATS_MESSAGE_ID, "unredacted-copy");
    mesh.js
        .publish_with_headers(deliver.clone(), h, unredacted.into())
        .await
        .unwrap()
        .await
        .unwrap();

    let out = pytest(
        &["test_redacted.py"],
        vec![
            ("AGENTMESH_REDACTED_NATS_URL", mesh.url()),
            (
                "AGENTMESH_REDACTED_EXPECT",
                serde_json::Value::Object(expect).to_string(),
            ),
            ("AGENTMESH_REDACTED_REFUSED", "1".into()),
        ],
    )
    .await
    .unwrap();
    println!("{out}");
    assert!(
        out.lines().any(|l| l.starts_with("PASSED")
            && l.ends_with("test_a_redacted_delivery_verifies_and_an_unredacted_copy_is_refused")),
        "{out}"
    );
}

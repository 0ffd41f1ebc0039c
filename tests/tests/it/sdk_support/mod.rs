//! Shared helpers for the SDK tests: `testkit`'s mesh (a real nats-server
//! with the mesh's streams, readers for what landed in each stream) and,
//! optionally, the real policy worker in-process on the shipped `policies/`.

// Test harness: a panic is how a test fails.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails; shared by several test binaries, each using a part of it"
)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agents_sdk::{Agent, AgentBuilder};
use async_nats::jetstream::message::StreamMessage;
use schemas::DecisionReceipt;
use testkit::eventually;
use tokio_util::sync::CancellationToken;

pub(crate) use testkit::{WAIT, header};

/// The shipped example policies.
pub(crate) fn shipped_policies() -> PathBuf {
    testkit::shipped_policies()
}

/// Logs to the test output when `RUST_LOG` is set.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// `testkit`'s mesh (a nats-server with the mesh's streams and buckets, and
/// its readers, through `Deref`) and, optionally, the policy worker running
/// in this process.
pub(crate) struct Mesh {
    mesh: testkit::Mesh,
    worker: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    _ready_dir: tempfile::TempDir,
}

impl std::ops::Deref for Mesh {
    type Target = testkit::Mesh;

    fn deref(&self) -> &testkit::Mesh {
        &self.mesh
    }
}

impl std::ops::DerefMut for Mesh {
    fn deref_mut(&mut self) -> &mut testkit::Mesh {
        &mut self.mesh
    }
}

impl Mesh {
    /// A fresh server with the streams applied; no policy worker.
    pub(crate) async fn start() -> Self {
        init_tracing();
        Self {
            mesh: testkit::Mesh::start().await.unwrap(),
            worker: None,
            _ready_dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Signs a delivery stored straight into `MESH_DELIVER` (as a policy
    /// worker would have) with a key this test trusts in `mesh-signers`.
    pub(crate) async fn sign(&self, h: &mut async_nats::HeaderMap, payload: &[u8]) {
        use schemas::signing::{SignerRecord, SignerStatus, SigningKey};
        static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(SigningKey::generate);
        let kv = self
            .js
            .get_key_value(schemas::subjects::BUCKET_SIGNERS)
            .await
            .unwrap();
        if kv.get(key.public_key()).await.unwrap().is_none() {
            let record = SignerRecord {
                public_key: key.public_key().to_owned(),
                name: "test worker".into(),
                status: SignerStatus::Active,
                added_at: String::new(),
                retired_at: String::new(),
                revoked_at: String::new(),
            };
            kv.put(
                key.public_key(),
                serde_json::to_vec(&record).unwrap().into(),
            )
            .await
            .unwrap();
        }
        let size = schemas::message_size(Some(h), payload);
        let (event, mode) = schemas::decode(Some(h), payload).unwrap();
        let source = schemas::AttributesReader::source(&event).to_string();
        let agent = source.trim_start_matches("/agents/").to_owned();
        let event = schemas::MeshEvent::validate(&agent, event, mode, size).unwrap();
        let mut receipt = DecisionReceipt {
            event_id: event.id().to_owned(),
            trace_id: event.trace.trace_id_hex(),
            decision: schemas::Decision::Allow,
            policy_hash: "test".into(),
            decision_id: uuid::Uuid::now_v7().to_string(),
            agent,
            event_type: event.event_type.as_str().to_owned(),
            target: event.target.as_ref().map(|t| t.to_string()),
            subject: schemas::AttributesReader::subject(&event.event).map(str::to_owned),
            decided_at: "2026-01-01T00:00:00.000001Z".into(),
            ..Default::default()
        };
        key.seal(&mut receipt, payload);
        h.insert(schemas::headers::DECISION_ID, receipt.decision_id.as_str());
        h.insert(schemas::headers::POLICY_HASH, receipt.policy_hash.as_str());
        h.insert(schemas::headers::TRACE_ID, receipt.trace_id.as_str());
        SigningKey::stamp(&receipt, h);
    }

    /// A fresh server and the policy worker on the shipped policies.
    pub(crate) async fn with_worker() -> Self {
        let mut mesh = Self::start().await;
        mesh.start_worker(None).await;
        mesh
    }

    /// Starts the policy worker on the shipped policies, signing with `key`
    /// (a key of its own, which it registers itself, when `None`).
    pub(crate) async fn start_worker(
        &mut self,
        key: Option<std::sync::Arc<schemas::signing::SigningKey>>,
    ) {
        self.start_worker_on(shipped_policies(), key).await;
    }

    /// Starts the policy worker on the policy directory `policies`.
    pub(crate) async fn start_worker_on(
        &mut self,
        policies: PathBuf,
        key: Option<std::sync::Arc<schemas::signing::SigningKey>>,
    ) {
        let ready = self._ready_dir.path().join("worker.ready");
        let _ = std::fs::remove_file(&ready);
        let config = policy_worker::Config {
            nats: broker_config::NatsArgs::url(self.nats.url()),
            policies,
            watch_policies: false,
            ready_file: Some(ready.clone()),
            ack_wait_secs: 2,
            grace: Duration::from_secs(1),
            signing_key: key,
            ..Default::default()
        };
        let token = CancellationToken::new();
        let handle = tokio::spawn({
            let token = token.clone();
            async move {
                if let Err(e) = policy_worker::run(config, token).await {
                    panic!("policy worker failed: {e}");
                }
            }
        });
        eventually(WAIT, "the policy worker to become ready", || {
            let ready = ready.exists();
            let finished = handle.is_finished();
            async move { (ready || finished).then_some(()) }
        })
        .await
        .unwrap();
        assert!(!handle.is_finished(), "the policy worker stopped at start");
        self.worker = Some((token, handle));
    }

    /// Stops the policy worker and waits until it has.
    pub(crate) async fn stop_worker(&mut self) {
        if let Some((token, handle)) = self.worker.take() {
            token.cancel();
            handle.await.unwrap();
        }
    }

    /// Connects an agent configured by `builder`.
    pub(crate) async fn agent(&self, builder: AgentBuilder) -> Agent {
        builder.connect(self.url()).await.unwrap()
    }

    /// The message at `sequence` of `MESH_INGRESS`.
    pub(crate) async fn ingress(&self, sequence: u64) -> StreamMessage {
        self.message_at(schemas::subjects::STREAM_INGRESS, sequence)
            .await
            .unwrap()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((token, _)) = &self.worker {
            token.cancel();
        }
    }
}

/// A `nats-server -js` started with extra arguments (e.g. authentication),
/// killed on drop.
pub(crate) struct CustomServer {
    child: Child,
    pub port: u16,
    _store: tempfile::TempDir,
}

impl CustomServer {
    pub(crate) async fn start(extra: &[&str]) -> Self {
        let binary = testkit::nats_server_binary().unwrap();
        let store = tempfile::tempdir().unwrap();
        let port = testkit::free_port().unwrap();
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually(WAIT, "nats-server to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await
        .unwrap();
        Self {
            child,
            port,
            _store: store,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for CustomServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

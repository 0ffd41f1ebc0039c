//! `testkit`'s mesh with ClickHouse, the policy worker (on the shipped
//! `policies/`) and the audit sink, the two services running in this
//! process: the mesh the `meshctl` tests drive the binary against.

use testkit::{Mesh, WAIT, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) use testkit::workspace;

/// A running mesh of the test's own (through `Deref`: `nats`, `js`, `ch()`,
/// and `db()`, the audit database unique to this test); [`Services::stop`]
/// ends both services.
pub(crate) struct Services {
    mesh: Mesh,
    pub tmp: tempfile::TempDir,
    pub shutdown: CancellationToken,
    /// The audit sink's checkpoint signing key (public), trusted in
    /// `mesh-signers`.
    #[allow(dead_code, reason = "read by the audit tests only")]
    pub sink_signer: String,
    worker: JoinHandle<Result<(), policy_worker::Error>>,
    sink: JoinHandle<Result<(), audit_sink::Error>>,
}

impl std::ops::Deref for Services {
    type Target = Mesh;

    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl Services {
    /// Starts the servers and both services, and waits until they are ready.
    pub(crate) async fn start(database: &str) -> anyhow::Result<Self> {
        let mesh = Mesh::with_clickhouse(database).await?;
        let (nats, ch, db) = (&mesh.nats, mesh.ch(), mesh.db().to_owned());
        let tmp = tempfile::tempdir()?;
        let shutdown = CancellationToken::new();
        let worker_ready = tmp.path().join("worker.ready");
        let worker = tokio::spawn(policy_worker::run(
            policy_worker::Config {
                nats: broker_config::NatsArgs::url(nats.url()),
                policies: testkit::shipped_policies(),
                ready_file: Some(worker_ready.clone()),
                watch_policies: false,
                ..Default::default()
            },
            shutdown.clone(),
        ));
        let sink_ready = tmp.path().join("sink.ready");
        let mut sink_config = audit_sink::Config::new(nats.url(), ch.url());
        sink_config.database = db;
        sink_config.batch_period_ms = 100;
        sink_config.ready_file = Some(sink_ready.clone());
        let sink_key = schemas::signing::SigningKey::generate();
        let sink_key_file = tmp.path().join("signing").join("audit-sink.nk");
        broker_config::credentials::write_seed_file(&sink_key_file, &sink_key.seed())?;
        sink_config.signing_key_file = Some(sink_key_file);
        let sink = tokio::spawn(audit_sink::run(sink_config, shutdown.clone()));
        for ready in [&worker_ready, &sink_ready] {
            eventually(WAIT, "the services' ready files", || async {
                ready.exists().then_some(())
            })
            .await?;
        }
        // Trusted as the operator would (`meshctl up` does for its own sink).
        let kv = mesh
            .js
            .get_key_value(schemas::subjects::BUCKET_SIGNERS)
            .await?;
        let record = schemas::signing::SignerRecord {
            public_key: sink_key.public_key().to_owned(),
            name: "audit-sink".into(),
            status: schemas::signing::SignerStatus::Active,
            added_at: "2026-01-01T00:00:00Z".into(),
            retired_at: String::new(),
            revoked_at: String::new(),
        };
        kv.put(sink_key.public_key(), serde_json::to_vec(&record)?.into())
            .await?;
        Ok(Self {
            sink_signer: sink_key.public_key().to_owned(),
            mesh,
            tmp,
            shutdown,
            worker,
            sink,
        })
    }

    /// Stops both services and returns what either failed with.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.worker.await??;
        self.sink.await??;
        Ok(())
    }
}

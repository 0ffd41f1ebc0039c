//! NATS, ClickHouse, the policy worker (on the shipped `policies/`) and the
//! audit sink, the two services running in this process: the mesh the
//! `meshctl` tests drive the binary against.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::{ClickHouseServer, NatsServer, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long starting the services may take.
const START: Duration = Duration::from_secs(60);

/// The repository's root.
pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running mesh of the test's own; [`Services::stop`] ends both services.
pub(crate) struct Services {
    pub nats: NatsServer,
    pub ch: ClickHouseServer,
    /// The audit database, unique to this test.
    pub db: String,
    pub tmp: tempfile::TempDir,
    pub shutdown: CancellationToken,
    /// The audit sink's checkpoint signing key (public), trusted in
    /// `mesh-signers`.
    #[allow(dead_code, reason = "read by the audit tests only")]
    pub sink_signer: String,
    worker: JoinHandle<Result<(), policy_worker::Error>>,
    sink: JoinHandle<Result<(), audit_sink::Error>>,
}

impl Services {
    /// Starts the servers and both services, and waits until they are ready.
    #[allow(dead_code, reason = "each test binary uses one of the two starts")]
    pub(crate) async fn start(database: &str) -> anyhow::Result<Self> {
        Ok(Self::start_on_backlog(database, 0).await?.0)
    }

    /// [`Services::start`], the services started only once `backlog`
    /// reasoning steps of one planner workflow wait in `MESH_INGRESS` (the
    /// worker then decides many at once); returns that workflow's trace id
    /// and the steps' event ids.
    #[allow(dead_code, reason = "each test binary uses one of the two starts")]
    pub(crate) async fn start_on_backlog(
        database: &str,
        backlog: usize,
    ) -> anyhow::Result<(Self, String, Vec<String>)> {
        let nats = NatsServer::start().await?;
        let ch = ClickHouseServer::start().await?;
        let (mut trace, mut ids) = (String::new(), Vec::new());
        if backlog > 0 {
            let js = async_nats::jetstream::new(nats.connect().await?);
            broker_config::apply(&js, &broker_config::Options::default()).await?;
            let planner = agents_sdk::Agent::connect("planner", nats.url()).await?;
            let wf = planner.workflow();
            trace = wf.trace_id().to_string();
            for n in 0..backlog {
                ids.push(wf.reasoning(format!("backlog step {n}")).await?.id);
            }
        }
        let db = ch.unique_database(database);
        let tmp = tempfile::tempdir()?;
        let shutdown = CancellationToken::new();
        let worker_ready = tmp.path().join("worker.ready");
        let worker = tokio::spawn(policy_worker::run(
            policy_worker::Config {
                nats: broker_config::NatsArgs::url(nats.url()),
                policies: workspace().join("policies"),
                ready_file: Some(worker_ready.clone()),
                watch_policies: false,
                ..Default::default()
            },
            shutdown.clone(),
        ));
        let sink_ready = tmp.path().join("sink.ready");
        let mut sink_config = audit_sink::Config::new(nats.url(), ch.url());
        sink_config.database = db.clone();
        sink_config.batch_period_ms = 100;
        sink_config.ready_file = Some(sink_ready.clone());
        let sink_key = schemas::signing::SigningKey::generate();
        let sink_key_file = tmp.path().join("signing").join("audit-sink.nk");
        broker_config::credentials::write_seed_file(&sink_key_file, &sink_key.seed())?;
        sink_config.signing_key_file = Some(sink_key_file);
        let sink = tokio::spawn(audit_sink::run(sink_config, shutdown.clone()));
        for ready in [&worker_ready, &sink_ready] {
            eventually(START, "the services' ready files", || async {
                ready.exists().then_some(())
            })
            .await?;
        }
        // Trusted as the operator would (`meshctl up` does for its own sink).
        let js = async_nats::jetstream::new(nats.connect().await?);
        let kv = js.get_key_value(schemas::subjects::BUCKET_SIGNERS).await?;
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
        let services = Self {
            sink_signer: sink_key.public_key().to_owned(),
            nats,
            ch,
            db,
            tmp,
            shutdown,
            worker,
            sink,
        };
        Ok((services, trace, ids))
    }

    /// Stops both services and returns what either failed with.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.worker.await??;
        self.sink.await??;
        Ok(())
    }
}

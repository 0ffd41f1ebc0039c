//! `testkit`'s mesh with ClickHouse, the policy worker (on the shipped
//! `policies/`) and the audit sink, the two services running in this
//! process: the mesh the `meshctl` tests drive the binary against.

use std::path::Path;

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
    /// The first worker and sink (`None` only while starting).
    worker: Option<Replica<policy_worker::Error>>,
    sink: Option<Replica<audit_sink::Error>>,
}

/// One service replica running in this process, with a signing key of its
/// own that the mesh trusts (`signer`, public).
pub(crate) struct Replica<E> {
    pub signer: String,
    token: CancellationToken,
    task: JoinHandle<Result<(), E>>,
}

impl<E: std::error::Error + Send + Sync + 'static> Replica<E> {
    /// Stops this replica alone and returns what it failed with.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.task.await??;
        Ok(())
    }
}

impl std::ops::Deref for Services {
    type Target = Mesh;

    fn deref(&self) -> &Mesh {
        &self.mesh
    }
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
        let mesh = Mesh::with_clickhouse(database).await?;
        let (mut trace, mut ids) = (String::new(), Vec::new());
        if backlog > 0 {
            let planner = agents_sdk::Agent::connect("planner", mesh.url()).await?;
            let wf = planner.workflow();
            trace = wf.trace_id().to_string();
            for n in 0..backlog {
                ids.push(wf.reasoning(format!("backlog step {n}")).await?.id);
            }
        }
        let tmp = tempfile::tempdir()?;
        let shutdown = CancellationToken::new();
        let mut services = Self {
            worker: None,
            sink: None,
            sink_signer: String::new(),
            mesh,
            tmp,
            shutdown,
        };
        services.worker = Some(services.worker_replica("worker").await?);
        let sink = services.sink_replica("sink").await?;
        services.sink_signer = sink.signer.clone();
        services.sink = Some(sink);
        Ok((services, trace, ids))
    }

    /// Starts one more policy worker (on the shipped policies, the shared
    /// durable) named `name`, and waits until it is ready.
    pub(crate) async fn worker_replica(
        &self,
        name: &str,
    ) -> anyhow::Result<Replica<policy_worker::Error>> {
        let key = schemas::signing::SigningKey::generate();
        let signer = self.trust(&key, name).await?;
        let ready = self.tmp.path().join(format!("{name}.ready"));
        let token = self.shutdown.child_token();
        let task = tokio::spawn(policy_worker::run(
            policy_worker::Config {
                nats: broker_config::NatsArgs::url(self.nats.url()),
                policies: testkit::shipped_policies(),
                ready_file: Some(ready.clone()),
                watch_policies: false,
                signing_key: Some(std::sync::Arc::new(key)),
                ..Default::default()
            },
            token.clone(),
        ));
        ready_file(&ready).await?;
        Ok(Replica {
            signer,
            token,
            task,
        })
    }

    /// Starts one more audit sink (the shared durables, its own checkpoint
    /// key) named `name`, and waits until it is ready.
    pub(crate) async fn sink_replica(
        &self,
        name: &str,
    ) -> anyhow::Result<Replica<audit_sink::Error>> {
        let key = schemas::signing::SigningKey::generate();
        let signer = self.trust(&key, name).await?;
        let ready = self.tmp.path().join(format!("{name}.ready"));
        let mut config = audit_sink::Config::new(self.nats.url(), self.ch().url());
        config.database = self.db().to_owned();
        config.batch_period_ms = 100;
        config.ready_file = Some(ready.clone());
        let key_file = self.tmp.path().join("signing").join(format!("{name}.nk"));
        broker_config::credentials::write_seed_file(&key_file, &key.seed())?;
        config.signing_key_file = Some(key_file);
        let token = self.shutdown.child_token();
        let task = tokio::spawn(audit_sink::run(config, token.clone()));
        ready_file(&ready).await?;
        Ok(Replica {
            signer,
            token,
            task,
        })
    }

    /// Trusts `key` in `mesh-signers` as the operator would (`meshctl up`
    /// does for its own services); returns its public key.
    async fn trust(
        &self,
        key: &schemas::signing::SigningKey,
        name: &str,
    ) -> anyhow::Result<String> {
        // The mesh applied the streams and buckets before any service started.
        let kv = self
            .js
            .get_key_value(schemas::subjects::BUCKET_SIGNERS)
            .await?;
        let record = schemas::signing::SignerRecord {
            public_key: key.public_key().to_owned(),
            name: name.into(),
            status: schemas::signing::SignerStatus::Active,
            added_at: "2026-01-01T00:00:00Z".into(),
            retired_at: String::new(),
            revoked_at: String::new(),
        };
        kv.put(key.public_key(), serde_json::to_vec(&record)?.into())
            .await?;
        Ok(key.public_key().to_owned())
    }

    /// Takes the first worker and sink out, for a test to stop them alone.
    #[allow(dead_code, reason = "used by the audit tests only")]
    pub(crate) fn take_first_pair(
        &mut self,
    ) -> anyhow::Result<(Replica<policy_worker::Error>, Replica<audit_sink::Error>)> {
        self.worker
            .take()
            .zip(self.sink.take())
            .ok_or_else(|| anyhow::anyhow!("the first pair was taken already"))
    }

    /// Stops both services and returns what either failed with.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(worker) = self.worker {
            worker.stop().await?;
        }
        if let Some(sink) = self.sink {
            sink.stop().await?;
        }
        Ok(())
    }
}

async fn ready_file(path: &Path) -> anyhow::Result<()> {
    eventually(WAIT, "a service's ready file", || async {
        path.exists().then_some(())
    })
    .await
}

//! Harness for the end-to-end tests: a nats-server of the test's own that
//! runs the authorization config `broker-config` renders, with an nkey for
//! the operator, every service and each agent the test names.
//!
//! The server reads a config file in a temporary directory; adding or
//! removing an agent rewrites the file and reloads the server
//! (`nats-server --signal reload=<pid>`), as `meshctl agents` does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use broker_config::auth::{self, Principal, Role};
use broker_config::credentials::{UserKey, generate_user_key};
use tokio_util::sync::CancellationToken;

pub mod faults;

/// How long the harness and the tests wait for something to happen.
pub use testkit::WAIT;

/// The services every secure mesh has, with their roles.
pub const SERVICES: [Role; 4] = [
    Role::Admin,
    Role::PolicyWorker,
    Role::AuditSink,
    Role::GpuScaler,
];

/// A nats-server running the rendered authorization config.
pub struct SecureNats {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    keys: BTreeMap<String, (Role, UserKey)>,
    /// The `server_name` in its config: readiness checks it, so a server of
    /// another test on the same port cannot pass for this one.
    name: String,
    /// What the services are told to do with redacted originals (the
    /// worker's grants follow it).
    redacted_original: broker_config::RedactedOriginal,
}

/// Server and client errors a connection received (permission violations
/// among them).
#[derive(Debug, Clone, Default)]
pub struct Events(Arc<Mutex<Vec<String>>>);

impl Events {
    /// Every event so far, as text.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Whether the server reported a permissions violation naming exactly
    /// `subject` (nats-server quotes it: `... for Publish to "<subject>"`),
    /// not a longer subject that merely contains it.
    pub fn violation(&self, subject: &str) -> bool {
        self.any_violation(&format!("\"{subject}\""))
    }

    /// Whether the server refused a subscription to exactly `subject`.
    pub fn subscription_violation(&self, subject: &str) -> bool {
        self.any_violation(&format!("subscription to \"{subject}\""))
    }

    fn any_violation(&self, needle: &str) -> bool {
        let needle = needle.to_lowercase();
        self.all().iter().any(|e| {
            let e = e.to_lowercase();
            e.contains("permissions violation") && e.contains(&needle)
        })
    }
}

impl SecureNats {
    /// Starts a server whose config has the operator, the services and
    /// `agents`; applies the streams and provisions the durables as the
    /// operator.
    pub async fn start(agents: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(agents, broker_config::RedactedOriginal::Keep).await
    }

    /// [`SecureNats::start`] with the grants of a mesh whose services do
    /// `redacted_original` with the originals of redacted deliveries.
    pub async fn start_with(
        agents: &[&str],
        redacted_original: broker_config::RedactedOriginal,
    ) -> anyhow::Result<Self> {
        let binary = testkit::nats_server_binary()?;
        let mut keys = BTreeMap::new();
        for role in SERVICES {
            let name = Principal::service(role, "").name;
            keys.insert(name, (role, generate_user_key()?));
        }
        for agent in agents {
            keys.insert((*agent).to_owned(), (Role::Agent, generate_user_key()?));
        }
        let mut server = Self {
            child: None,
            binary,
            port: 0,
            dir: tempfile::tempdir()?,
            keys,
            name: format!("e2e-{}", uuid::Uuid::new_v4().simple()),
            redacted_original,
        };
        // The port is picked before the server binds it; should another
        // process take it in between, the server exits and gets a new one.
        let mut attempt = 1;
        let js = loop {
            server.port = testkit::free_port()?;
            server.write_config()?;
            match server.spawn().await {
                Ok(js) => break js,
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        broker_config::apply(&js, &broker_config::Options::default()).await?;
        broker_config::provision_services(&js).await?;
        for agent in agents {
            broker_config::provision_agent(&js, agent).await?;
        }
        Ok(server)
    }

    /// Starts the server on the written config and waits until the
    /// operator's JetStream requests are answered; fails with the end of the
    /// server's log when it exits first.
    async fn spawn(&mut self) -> anyhow::Result<async_nats::jetstream::Context> {
        let log = self.log_path();
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting `{}`", self.binary.display()))?;
        self.child = Some(child);
        // Held outside `self` while the check borrows `self` to connect.
        let mut child = self.child.take();
        let ready = testkit::until_ready(
            child.as_mut(),
            WAIT,
            "nats-server with the rendered config answered",
            || format!("{}:\n{}", log.display(), testkit::log_tail(&log)),
            || async {
                let js = self.jetstream(auth::ADMIN).await.ok()?;
                let ours = js.client().server_info().server_name == self.name;
                (ours && testkit::js_answers(&js).await).then_some(js)
            },
        )
        .await;
        self.child = child;
        ready
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.conf")
    }

    /// The principals in the config now.
    pub fn principals(&self) -> Vec<Principal> {
        self.keys
            .iter()
            .map(|(name, (role, key))| Principal {
                name: name.clone(),
                role: *role,
                public_key: key.public_key.clone(),
            })
            .collect()
    }

    /// The rendered config file's text.
    pub fn config_text(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.config_path())?)
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let text = auth::render_server_config(&auth::ServerConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            store_dir: self.dir.path().join("jetstream"),
            principals: Some(self.principals()),
            cluster: None,
            http_port: None,
            durability: testkit::nats_durability(),
            redacted_original: self.redacted_original,
        })?;
        let text = format!("{text}\nserver_name: \"{}\"\n", self.name);
        std::fs::write(self.config_path(), text)?;
        Ok(())
    }

    /// Sends the reload signal.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .context("the server is not running")?;
        let status = Command::new(&self.binary)
            .arg("--signal")
            .arg(format!("reload={pid}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "nats-server --signal reload failed");
        Ok(())
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The seed of `name` (agent id or service name).
    pub fn seed(&self, name: &str) -> anyhow::Result<String> {
        self.keys
            .get(name)
            .map(|(_, k)| k.seed.clone())
            .with_context(|| format!("no key for `{name}`"))
    }

    /// Writes the seed of `name` to a file only its owner can read (what a
    /// service's `--nats-nkey-seed-file` takes); returns the path.
    pub fn seed_file(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("keys").join(format!("{name}.nk"));
        broker_config::credentials::write_seed_file(&path, &self.seed(name)?)?;
        Ok(path)
    }

    /// A connection authenticated as `name`, with its server errors recorded.
    pub async fn connect_as(&self, name: &str) -> anyhow::Result<(async_nats::Client, Events)> {
        self.connect_with_seed(&self.seed(name)?).await
    }

    /// A connection authenticated with `seed` (no reconnects, so a revoked
    /// key shows as a closed connection).
    pub async fn connect_with_seed(
        &self,
        seed: &str,
    ) -> anyhow::Result<(async_nats::Client, Events)> {
        let events = Events::default();
        let sink = events.clone();
        let client = async_nats::ConnectOptions::new()
            .nkey(seed.to_owned())
            .max_reconnects(1)
            .request_timeout(Some(Duration::from_secs(3)))
            .event_callback(move |event| {
                let sink = sink.clone();
                async move {
                    let error = matches!(
                        event,
                        async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_)
                    );
                    if error && let Ok(mut v) = sink.0.lock() {
                        v.push(event.to_string());
                    }
                }
            })
            .connect(self.url())
            .await?;
        Ok((client, events))
    }

    /// A JetStream context authenticated as `name`.
    pub async fn jetstream(&self, name: &str) -> anyhow::Result<async_nats::jetstream::Context> {
        let (client, _) = self.connect_as(name).await?;
        Ok(jetstream(client))
    }

    /// Registers agent `id` with a new key, reloads, provisions its durable.
    ///
    /// nats-server 2.9 wires the service imports of an account that a
    /// reload creates only on the next reload (the user can connect, but
    /// its requests find no responders), so this reloads until the new
    /// agent's JetStream requests are answered — as `meshctl agents add` does.
    pub async fn add_agent(&mut self, id: &str) -> anyhow::Result<()> {
        self.keys
            .insert(id.to_owned(), (Role::Agent, generate_user_key()?));
        self.write_config()?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            self.reload()?;
            let probe = testkit::eventually(
                Duration::from_secs(2),
                "the new agent's JetStream requests to be answered",
                || async {
                    let (client, _) = self.connect_as(id).await.ok()?;
                    client
                        .request("$JS.API.STREAM.INFO.KV_mesh-agents", "".into())
                        .await
                        .ok()
                },
            )
            .await;
            if probe.is_ok() {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "agent `{id}` still cannot reach JetStream after reloading for {WAIT:?}"
            );
        }
        let js = self.jetstream(auth::ADMIN).await?;
        broker_config::provision_agent(&js, id).await?;
        Ok(())
    }

    /// Removes agent `id` from the config and reloads; returns its old seed.
    pub async fn remove_agent(&mut self, id: &str) -> anyhow::Result<String> {
        let (_, key) = self
            .keys
            .remove(id)
            .with_context(|| format!("no agent `{id}`"))?;
        self.write_config()?;
        self.reload()?;
        testkit::eventually(
            WAIT,
            "the reloaded config to refuse the old key",
            || async {
                self.connect_with_seed(&key.seed)
                    .await
                    .is_err()
                    .then_some(())
            },
        )
        .await?;
        Ok(key.seed)
    }
}

impl SecureNats {
    /// A fresh decision signing key, added to `mesh-signers` by the
    /// operator (as `meshctl up` does for the worker it starts).
    pub async fn trusted_signing_key(&self) -> anyhow::Result<Arc<schemas::signing::SigningKey>> {
        let key = schemas::signing::SigningKey::generate();
        let (admin, _) = self.connect_as(auth::ADMIN).await?;
        let kv = jetstream(admin)
            .get_key_value(schemas::subjects::BUCKET_SIGNERS)
            .await?;
        let record = schemas::signing::SignerRecord {
            public_key: key.public_key().to_owned(),
            name: "policy-worker".into(),
            status: schemas::signing::SignerStatus::Active,
            added_at: "2026-01-01T00:00:00Z".into(),
            retired_at: String::new(),
            revoked_at: String::new(),
        };
        kv.put(key.public_key(), serde_json::to_vec(&record)?.into())
            .await?;
        Ok(Arc::new(key))
    }
}

/// Starts the policy worker in-process with its own key and the shipped
/// policies; returns its stop token once it is ready.
pub async fn start_worker(mesh: &SecureNats) -> anyhow::Result<CancellationToken> {
    start_worker_on(mesh, testkit::shipped_policies()).await
}

/// [`start_worker`] with the policy directory `policies` (its
/// `cache.toml`, entities, …).
pub async fn start_worker_on(
    mesh: &SecureNats,
    policies: std::path::PathBuf,
) -> anyhow::Result<CancellationToken> {
    let ready = mesh
        .dir
        .path()
        .join(format!("worker-{}.ready", uuid::Uuid::new_v4().simple()));
    let config = policy_worker::Config {
        nats: broker_config::NatsArgs {
            url: mesh.url(),
            credentials: broker_config::NatsCredentials {
                nkey_seed_file: Some(mesh.seed_file(auth::POLICY_WORKER)?),
                creds_file: None,
            },
        },
        policies,
        watch_policies: false,
        ready_file: Some(ready.clone()),
        signing_key: Some(mesh.trusted_signing_key().await?),
        ..Default::default()
    };
    let token = CancellationToken::new();
    let mut handle = tokio::spawn(policy_worker::run(config, token.clone()));
    until_started(&ready, &mut handle, "the policy worker").await?;
    Ok(token)
}

/// Waits until a service run in-process on `handle` has written its
/// `ready` file; a task that ends first is an error naming `name`, with
/// what the task returned.
pub async fn until_started<T: std::fmt::Debug>(
    ready: &std::path::Path,
    handle: &mut tokio::task::JoinHandle<T>,
    name: &str,
) -> anyhow::Result<()> {
    testkit::eventually(WAIT, &format!("{name} to become ready"), || async {
        (ready.exists() || handle.is_finished()).then_some(())
    })
    .await?;
    if handle.is_finished() {
        let result = handle.await;
        anyhow::bail!("{name} stopped at start: {result:?}");
    }
    Ok(())
}

/// A JetStream context on `client` that gives up on an answer after 2 s
/// (a request the server refused never gets one).
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    js
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! Test harness: real servers for integration tests, started fresh on free
//! ports with their data in a temporary directory and stopped (data deleted)
//! when the handle drops — and polling helpers, so no test sleeps blindly.
//!
//! `NATS_SERVER_BIN` overrides the `nats-server` binary (default: from `PATH`).

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod clickhouse;
pub use self::clickhouse::ClickHouseServer;

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` every 20 ms until it yields `Some`, or fails after `timeout`
/// with `what` in the message.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finds `name` on `PATH` (or the path in `env_override`), with an error that
/// names the package to install.
pub fn find_binary(name: &str, env_override: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(env_override) {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` not found on PATH: install it (`apt-get install {package}`) or set `{env_override}`"))
}

/// A `nats-server -js` of the test's own.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    binary: PathBuf,
}

impl NatsServer {
    /// Starts a fresh server with JetStream on a free port and waits until
    /// JetStream answers.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = find_binary("nats-server", "NATS_SERVER_BIN", "nats-server")?;
        let store = tempfile::tempdir().context("creating the JetStream store directory")?;
        let mut server = Self {
            child: None,
            port: free_port()?,
            store,
            binary,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `{}`", self.binary.display()))?;
        self.child = Some(child);
        let url = self.url();
        eventually(
            Duration::from_secs(20),
            "nats-server with JetStream",
            || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(&url).await.ok()?;
                    // Any JetStream API answer will do; "stream not found" is one.
                    // (Account info is not used: this client cannot parse 2.9's.)
                    match async_nats::jetstream::new(client)
                        .get_stream("READINESS_PROBE")
                        .await
                    {
                        Ok(_) => Some(()),
                        Err(e) => matches!(
                            e.kind(),
                            async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
                        )
                        .then_some(()),
                    }
                }
            },
        )
        .await?;
        Ok(())
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the server again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// A connected client.
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .context("connecting to the test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

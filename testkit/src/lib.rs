//! Test harness: real servers for integration tests, started fresh on free
//! ports with their data in a temporary directory and stopped (data deleted)
//! when the handle drops — and polling helpers, so no test sleeps blindly.
//!
//! `NATS_SERVER_BIN` overrides the `nats-server` binary (default: the first on
//! `PATH` that can fsync each write, see [`nats_server_binary`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod clickhouse;
mod cluster;
pub mod lazyfs;
pub mod shape;
pub mod zookeeper;
pub use self::clickhouse::ClickHouseServer;
pub use self::cluster::NatsCluster;
pub use self::lazyfs::LazyFs;
pub use self::zookeeper::ZooKeeperServer;

/// The longest any test waits for something to happen (a server to start,
/// a service to become ready, a row or message to arrive): the slowest
/// suite's need, one constant for every test crate.
pub const WAIT: Duration = Duration::from_secs(60);

/// A port that was free a moment ago, for a server a test starts.
///
/// Picked at random below the kernel's ephemeral range (`portpicker`), so
/// the outgoing connections of other tests, which take their local ports
/// from that range, cannot take it before the server binds it.
pub fn free_port() -> anyhow::Result<u16> {
    portpicker::pick_unused_port().context("no free TCP port on 127.0.0.1")
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

/// Polls `check` like [`eventually`] until it yields `Some`, but fails at
/// once when `child` exits first; either failure ends with `log()` (what the
/// process wrote), so a server that could not start says why.
pub async fn until_ready<T, F, Fut>(
    mut child: Option<&mut Child>,
    timeout: Duration,
    what: &str,
    log: impl Fn() -> String,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let outcome = eventually(timeout, what, || {
        let exited = child.as_mut().map(|c| c.try_wait());
        let pending = check();
        async move {
            match exited {
                Some(Ok(Some(status))) => {
                    Some(Err(anyhow::anyhow!("exited with {status} before {what}")))
                }
                Some(Err(e)) => Some(Err(anyhow::anyhow!("cannot be waited on: {e}"))),
                _ => pending.await.map(Ok),
            }
        }
    })
    .await;
    outcome
        .and_then(|result| result)
        .map_err(|e| anyhow::anyhow!("{e}; its log:\n{}", log()))
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

/// The `nats-server` binary: the one `NATS_SERVER_BIN` names (any release:
/// the compatibility run on Debian's 2.9), else the first on `PATH` that can
/// fsync each write (2.10 or newer; the stack's default is 2.15.1, which
/// `scripts/install-deps.sh` installs). Found once per test process.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    found_nats_server().map(|found| found.path)
}

fn found_nats_server() -> anyhow::Result<broker_config::server::NatsBinary> {
    static FOUND: std::sync::OnceLock<Result<broker_config::server::NatsBinary, String>> =
        std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            broker_config::server::find_nats_server()
                .map_err(|e| format!("{e}: {}", broker_config::server::INSTALL_HINT))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The durability the test servers run with, as the stack's own default:
/// `always` (every write fsynced before it is acknowledged), unless
/// `AGENTMESH_DURABILITY=interval` asks for the server's 2-minute flush, or
/// the binary is older than 2.10 (the compatibility run on Debian's 2.9,
/// which cannot fsync each write).
pub fn nats_durability() -> broker_config::server::Durability {
    use broker_config::server::Durability;
    let asked = std::env::var("AGENTMESH_DURABILITY")
        .ok()
        .and_then(|d| Durability::parse(&d))
        .unwrap_or_default();
    match found_nats_server() {
        Ok(found) if !found.version.can_sync_always() => Durability::Interval,
        _ => asked,
    }
}

/// The message block files (`*.blk`, oldest first) of `stream` in the
/// JetStream store directory `store` (a server's `-sd`, or a cluster
/// node's [`Store::dir`]), for a test that damages them while the server
/// is down.
pub fn stream_blocks(store: &Path, stream: &str) -> anyhow::Result<Vec<PathBuf>> {
    // `<store>/jetstream/<account>/streams/<stream>/msgs/<n>.blk`
    let accounts = store.join("jetstream");
    let mut blocks = Vec::new();
    for account in
        std::fs::read_dir(&accounts).with_context(|| format!("reading {}", accounts.display()))?
    {
        let msgs = account?.path().join("streams").join(stream).join("msgs");
        for entry in std::fs::read_dir(&msgs).into_iter().flatten() {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "blk") {
                blocks.push(path);
            }
        }
    }
    let index = |p: &PathBuf| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
    };
    blocks.sort_by_key(index);
    Ok(blocks)
}

/// A `nats-server -js` of the test's own; its log is `nats-server.log` in
/// [`NatsServer::log_path`].
pub struct NatsServer {
    child: Option<Child>,
    /// The client port, once the server has bound one.
    port: Option<u16>,
    /// The monitoring port, likewise.
    http_port: Option<u16>,
    dir: tempfile::TempDir,
    binary: PathBuf,
    store: Store,
}

/// Where and how a test server keeps its JetStream store
/// ([`NatsServer::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct Store {
    /// The store directory (default: `store` in the server's temporary
    /// directory), e.g. on a [`LazyFs`] to cut its power.
    pub dir: Option<PathBuf>,
    /// `jetstream { sync_interval }`: `always` fsyncs each write before the
    /// acknowledgement, `2m` is the server's own default (nats-server 2.10
    /// or newer; 2.9 refuses the field). `None` takes the harness default,
    /// [`nats_durability`]: `always`, as every stack the project starts.
    pub sync_interval: Option<String>,
}

impl NatsServer {
    /// Starts a fresh server with JetStream on a port of its choosing
    /// (`-p -1`, read back from its ports file, so no other process can take
    /// the port in between) and waits until JetStream answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Store::default()).await
    }

    /// [`NatsServer::start`] with the store where and as `store` says.
    pub async fn start_with(store: Store) -> anyhow::Result<Self> {
        let binary = nats_server_binary()?;
        let dir = tempfile::tempdir().context("creating the nats-server directory")?;
        let mut server = Self {
            child: None,
            port: None,
            http_port: None,
            dir,
            binary,
            store,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = self.log_path();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let ports_dir = self.dir.path().join("ports");
        // A restart keeps the port the clients know; the first start lets the
        // server pick one.
        let port = self.port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)
            .with_context(|| format!("creating {}", ports_dir.display()))?;
        let mut command = Command::new(&self.binary);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(self.store_dir())
            .arg("--ports_file_dir")
            .arg(&ports_dir);
        // The monitoring port (`/varz`) stays across restarts, as the
        // client port does.
        let http = self
            .http_port
            .map_or_else(|| "-1".to_owned(), |p| p.to_string());
        command.args(["-m", &http]);
        let sync_interval = self
            .store
            .sync_interval
            .clone()
            .or_else(|| nats_durability().sync_interval().map(str::to_owned));
        if let Some(interval) = &sync_interval {
            let config = self.dir.path().join("nats-server.conf");
            std::fs::write(
                &config,
                format!("jetstream {{ sync_interval: {interval:?} }}\n"),
            )
            .with_context(|| format!("writing {}", config.display()))?;
            command.arg("-c").arg(config);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting `{}`", self.binary.display()))?;
        self.child = Some(child);
        let known = self.port;
        let port = until_ready(
            self.child.as_mut(),
            WAIT,
            "nats-server answered JetStream requests",
            || format!("{}:\n{}", log.display(), log_tail(&log)),
            || {
                let port = known.or_else(|| read_ports_file(&ports_dir));
                async move {
                    let port = port?;
                    jetstream_answers(port).await.then_some(port)
                }
            },
        )
        .await
        .context("nats-server")?;
        self.port = Some(port);
        self.http_port = self.http_port.or_else(|| read_monitoring_port(&ports_dir));
        Ok(())
    }

    /// `http://127.0.0.1:<port>` of the server's monitoring endpoint
    /// (`/varz`, `/jsz`).
    pub fn monitoring_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port.unwrap_or_default())
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port.unwrap_or_default())
    }

    /// The server's process id while it runs (for CPU accounting in benchmarks).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.store
            .dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("store"))
    }

    /// The message block files (`*.blk`, oldest first) of `stream` in the
    /// store, for a test that damages them while the server is down.
    pub fn stream_blocks(&self, stream: &str) -> anyhow::Result<Vec<PathBuf>> {
        stream_blocks(&self.store_dir(), stream)
    }

    /// Starts the server again after [`NatsServer::kill`] (on the same port
    /// and store); a no-op when it runs.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn().await
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server as an operator would (SIGTERM: it writes its
    /// streams' and consumers' state and exits) and waits for it to exit,
    /// within [`WAIT`].
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("running `kill`")?;
        anyhow::ensure!(
            status.success(),
            "`kill -TERM` on nats-server failed: {status}"
        );
        eventually(WAIT, "nats-server to exit after SIGTERM", || {
            let exited = child.try_wait().ok().flatten().is_some();
            async move { exited.then_some(()) }
        })
        .await?;
        self.child = None;
        Ok(())
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

/// The client port in the `<name>_<pid>.ports` file nats-server writes into
/// `dir` once it listens: `{"nats":["nats://127.0.0.1:4222"]}`.
fn read_ports_file(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let rest = &text[text.find("nats://")? + "nats://".len()..];
    let end = rest.find('"')?;
    let (_, port) = rest[..end].rsplit_once(':')?;
    port.parse().ok()
}

/// The monitoring port in the same ports file: `"monitoring":["http://127.0.0.1:8222"]`.
fn read_monitoring_port(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let rest = &text[text.find("http://")? + "http://".len()..];
    let end = rest.find('"')?;
    let (_, port) = rest[..end].rsplit_once(':')?;
    port.parse().ok()
}

/// Whether a JetStream request to the server on `port` gets an answer.
async fn jetstream_answers(port: u16) -> bool {
    match async_nats::connect(format!("nats://127.0.0.1:{port}")).await {
        Ok(client) => js_answers(&async_nats::jetstream::new(client)).await,
        Err(_) => false,
    }
}

/// Whether a JetStream request on `js` gets an answer; any JetStream answer
/// will do ("stream not found" is one). Account info is not used: this
/// client cannot parse nats-server 2.9's.
pub async fn js_answers(js: &async_nats::jetstream::Context) -> bool {
    match js.get_stream("READINESS_PROBE").await {
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
        ),
    }
}

/// The last 2,000 bytes of the file at `path` (empty when unreadable).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn reads_the_client_port_from_the_ports_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_ports_file(dir.path()), None);
        std::fs::write(
            dir.path().join("nats-server_42.ports"),
            r#"{"nats":["nats://127.0.0.1:42107"],"monitoring":["http://127.0.0.1:8222"]}"#,
        )
        .unwrap();
        assert_eq!(read_ports_file(dir.path()), Some(42107));
        assert_eq!(read_monitoring_port(dir.path()), Some(8222));
    }

    #[tokio::test]
    async fn nats_server_restarts_on_its_port_and_reports_why_it_could_not() {
        let mut server = NatsServer::start().await.unwrap();
        let url = server.url();
        assert_ne!(url, "nats://127.0.0.1:0");
        server.restart().await.unwrap();
        assert_eq!(server.url(), url);
        server.connect().await.unwrap();

        // Another process takes the port while the server is down: the
        // restart fails at once with the server's own words.
        server.kill();
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let started = Instant::now();
        let error = format!("{:#}", server.restart().await.unwrap_err());
        assert!(error.contains("address already in use"), "{error}");
        assert!(started.elapsed() < WAIT, "{error}");
    }
}

pub mod load;
pub mod mesh;
pub mod metrics;
pub mod policies;
pub mod process;
pub mod streams;
pub use self::mesh::{Headers, Mesh, header, receipt, receipts};
pub use self::metrics::sample_value;
pub use self::policies::{policies_copy, python, shipped_policies, workspace};
pub use self::process::{LogLines, Service};
pub use self::streams::{stream_messages, subject_messages};

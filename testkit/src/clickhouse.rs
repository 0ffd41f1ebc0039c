//! A `clickhouse-server` of the test's own: a config written into a temporary
//! directory (free HTTP and TCP ports on 127.0.0.1, data, tmp and user files
//! in that directory, a `default` user without password), started and awaited
//! until it answers over HTTP with the instance id written into its config
//! (so another test's server on the same port cannot pass for it), killed on
//! drop.
//!
//! `CLICKHOUSE_SERVER_BIN` overrides the binary (default: `clickhouse-server`
//! from `PATH` or `/usr/sbin`). `CLICKHOUSE_URL` points the tests at an
//! external server instead: nothing is started, and each test keeps to a
//! database of its own ([`ClickHouseServer::unique_database`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{WAIT, eventually, find_binary, free_port, log_tail, until_ready};

/// A ClickHouse server for one test: local (spawned) or external (`CLICKHOUSE_URL`).
pub struct ClickHouseServer {
    mode: Mode,
}

enum Mode {
    Local(Local),
    External { url: String },
}

struct Local {
    child: Option<Child>,
    binary: PathBuf,
    http_port: u16,
    tcp_port: u16,
    /// Written into the config (`system.macros`), to tell this server from
    /// another one on the same port.
    instance: String,
    dir: tempfile::TempDir,
}

impl ClickHouseServer {
    /// Starts a fresh server on free ports (or attaches to `CLICKHOUSE_URL`)
    /// and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::launch(None, None).await
    }

    /// Starts a fresh local server (never `CLICKHOUSE_URL`) whose data
    /// directory (tables, parts, metadata) lies in `parent`, e.g. on a
    /// [`crate::LazyFs`] to cut its power; config, logs and `tmp` stay in
    /// the server's own temporary directory. After a power cut the server
    /// starts with what survived: broken parts are set aside (detached)
    /// however many there are, as an operator does to recover.
    pub async fn start_with_data_in(parent: &Path) -> anyhow::Result<Self> {
        Self::launch(None, Some(parent)).await
    }

    /// Starts a fresh local server on free ports as replica `name` of shard
    /// `01`, coordinated by `zookeeper` (macros `{shard}` and `{replica}`,
    /// an interserver HTTP port of its own on 127.0.0.1, from which the
    /// other replicas fetch its parts), and waits until it answers.
    /// `CLICKHOUSE_URL` is not used: replicas are always local.
    pub async fn start_replica(
        zookeeper: &crate::ZooKeeperServer,
        name: &str,
    ) -> anyhow::Result<Self> {
        Self::launch(Some((zookeeper.port(), name)), None).await
    }

    async fn launch(replica: Option<(u16, &str)>, data: Option<&Path>) -> anyhow::Result<Self> {
        if replica.is_none()
            && data.is_none()
            && let Ok(url) = std::env::var("CLICKHOUSE_URL")
            && !url.is_empty()
        {
            let mut server = Self {
                mode: Mode::External { url },
            };
            server.wait_ready(None).await?;
            return Ok(server);
        }
        let binary = find_binary(
            "clickhouse-server",
            "CLICKHOUSE_SERVER_BIN",
            "clickhouse-server",
        )?;
        // Ports are picked before the server binds them; should another
        // process take one in between, the server exits and gets new ones.
        let mut attempt = 1;
        loop {
            let dir = tempfile::tempdir().context("creating the ClickHouse directory")?;
            let http_port = free_port()?;
            let mut tcp_port = free_port()?;
            while tcp_port == http_port {
                tcp_port = free_port()?;
            }
            let instance = uuid::Uuid::new_v4().simple().to_string();
            let replica = match replica {
                Some((zookeeper_port, name)) => {
                    let mut interserver_port = free_port()?;
                    while [http_port, tcp_port].contains(&interserver_port) {
                        interserver_port = free_port()?;
                    }
                    Some(Replica {
                        zookeeper_port,
                        name,
                        interserver_port,
                    })
                }
                None => None,
            };
            if let Some(parent) = data {
                let target = parent.join(format!("clickhouse-{instance}"));
                std::fs::create_dir_all(&target)
                    .with_context(|| format!("creating {}", target.display()))?;
                let link = dir.path().join("data");
                std::os::unix::fs::symlink(&target, &link).with_context(|| {
                    format!("linking {} to {}", link.display(), target.display())
                })?;
            }
            write_config(
                dir.path(),
                http_port,
                tcp_port,
                &instance,
                replica.as_ref(),
                data.is_some(),
            )?;
            let mut server = Self {
                mode: Mode::Local(Local {
                    child: None,
                    binary: binary.clone(),
                    http_port,
                    tcp_port,
                    instance,
                    dir,
                }),
            };
            match server.start_again().await {
                Ok(()) => return Ok(server),
                Err(_) if attempt < 3 && server.port_was_taken() => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:<http port>` (or `CLICKHOUSE_URL`).
    pub fn url(&self) -> String {
        match &self.mode {
            Mode::Local(local) => format!("http://127.0.0.1:{}", local.http_port),
            Mode::External { url } => url.clone(),
        }
    }

    /// The native-protocol port (for `clickhouse-client --port`), when local.
    pub fn tcp_port(&self) -> Option<u16> {
        match &self.mode {
            Mode::Local(local) => Some(local.tcp_port),
            Mode::External { .. } => None,
        }
    }

    /// The server's process id while a local one runs (for CPU accounting
    /// in benchmarks).
    pub fn pid(&self) -> Option<u32> {
        match &self.mode {
            Mode::Local(local) => local.child.as_ref().map(Child::id),
            Mode::External { .. } => None,
        }
    }

    /// Whether this is an external server (`CLICKHOUSE_URL`) that the test
    /// cannot stop or restart.
    pub fn is_external(&self) -> bool {
        matches!(self.mode, Mode::External { .. })
    }

    /// A database name no other test uses: `<prefix>_<random>`.
    pub fn unique_database(&self, prefix: &str) -> String {
        format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
    }

    /// A client for this server (validation off: ClickHouse 18.16 has no
    /// `RowBinaryWithNamesAndTypes`).
    pub fn client(&self) -> ::clickhouse::Client {
        ::clickhouse::Client::default()
            .with_url(self.url())
            .with_validation(false)
    }

    /// Runs `sql` and returns the result as TabSeparated text.
    pub async fn query_text(&self, sql: &str) -> anyhow::Result<String> {
        query_text(&self.client(), sql).await
    }

    /// `SELECT version()`, e.g. `18.16.1`.
    pub async fn version(&self) -> anyhow::Result<String> {
        Ok(self.query_text("SELECT version()").await?.trim().to_owned())
    }

    /// Kills the server (SIGKILL) and waits for it to exit; ports and data
    /// stay for [`ClickHouseServer::start_again`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match &mut self.mode {
            Mode::Local(local) => {
                local.kill();
                Ok(())
            }
            Mode::External { .. } => {
                bail!("cannot stop the external ClickHouse at `CLICKHOUSE_URL`")
            }
        }
    }

    /// Starts the server again on the same ports and data (a no-op wait for
    /// readiness when it is running) and waits until it answers.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let Mode::Local(local) = &mut self.mode else {
            bail!("cannot start the external ClickHouse at `CLICKHOUSE_URL`");
        };
        if local.child.is_none() {
            let config = local.dir.path().join("config.xml");
            let child = Command::new(&local.binary)
                .arg(format!("--config-file={}", config.display()))
                .current_dir(local.dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting `{}`", local.binary.display()))?;
            local.child = Some(child);
        }
        let log = local.dir.path().join(clickhouse_config::ERROR_LOG);
        self.wait_ready(Some(&log)).await
    }

    /// Whether the local server's error log says a port was taken.
    fn port_was_taken(&self) -> bool {
        let Mode::Local(local) = &self.mode else {
            return false;
        };
        std::fs::read_to_string(local.dir.path().join(clickhouse_config::ERROR_LOG))
            .is_ok_and(|log| log.to_lowercase().contains("address already in use"))
    }

    /// Waits until the server answers: a local one with the instance id in
    /// its config (so a server of another test that holds the port does
    /// not pass for this one), an external one `SELECT 1`.
    async fn wait_ready(&mut self, error_log: Option<&Path>) -> anyhow::Result<()> {
        let client = self.client();
        let url = self.url();
        let instance = match &self.mode {
            Mode::Local(local) => Some(local.instance.clone()),
            Mode::External { .. } => None,
        };
        let child = match &mut self.mode {
            Mode::Local(local) => local.child.as_mut(),
            Mode::External { .. } => None,
        };
        let ready = until_ready(
            child,
            WAIT,
            &format!("ClickHouse at {url} answered"),
            || error_log.map(log_tail).unwrap_or_default(),
            || {
                let (client, instance) = (client.clone(), instance.clone());
                async move {
                    let answered = match instance {
                        Some(id) => client
                            .query(&format!(
                                "SELECT substitution FROM system.macros WHERE macro = '{INSTANCE_MACRO}'"
                            ))
                            .fetch_one::<String>()
                            .await
                            .is_ok_and(|found| found == id),
                        None => matches!(client.query("SELECT 1").fetch_one::<u8>().await, Ok(1)),
                    };
                    answered.then_some(())
                }
            },
        )
        .await
        .context("clickhouse-server");
        // An exited server is started again by `start_again`.
        if let Mode::Local(local) = &mut self.mode
            && local
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            local.child = None;
        }
        ready
    }

    /// Polls `SELECT count()` of `sql_from_where` (e.g. `db.events FINAL`)
    /// until it is at least `rows`, returning the count.
    pub async fn wait_for_rows(
        &self,
        from: &str,
        rows: u64,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let client = self.client();
        let sql = format!("SELECT count() FROM {from}");
        eventually(timeout, &format!("{rows} rows in `{from}`"), || {
            let client = client.clone();
            let sql = sql.clone();
            async move {
                let n = client.query(&sql).fetch_one::<u64>().await.ok()?;
                (n >= rows).then_some(n)
            }
        })
        .await
    }
}

impl Local {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        if let Mode::Local(local) = &mut self.mode {
            local.kill();
        }
    }
}

/// Runs `sql` with `client` and returns the result as TabSeparated text.
pub async fn query_text(client: &::clickhouse::Client, sql: &str) -> anyhow::Result<String> {
    let mut cursor = client
        .query_raw(sql)
        .fetch_bytes("TabSeparated")
        .with_context(|| format!("running `{sql}`"))?;
    let bytes = cursor
        .collect()
        .await
        .with_context(|| format!("running `{sql}`"))?;
    String::from_utf8(bytes.to_vec()).context("ClickHouse answered with bytes that are not UTF-8")
}

/// What makes a server a replica: its ZooKeeper, its name (macro
/// `{replica}`; `{shard}` is `01`) and its interserver HTTP port.
struct Replica<'a> {
    zookeeper_port: u16,
    name: &'a str,
    interserver_port: u16,
}

/// The macro that holds a local server's instance id.
const INSTANCE_MACRO: &str = "testkit_instance";

/// The config of a local test server, as `meshctl up` writes one (the
/// shared `clickhouse-config` crate): user `default` without a password,
/// `instance` in `system.macros`, and for a replica its ZooKeeper, its
/// interserver port and the macros `{shard}` (`01`) and `{replica}`.
fn write_config(
    dir: &Path,
    http_port: u16,
    tcp_port: u16,
    instance: &str,
    replica: Option<&Replica<'_>>,
    after_power_loss: bool,
) -> anyhow::Result<()> {
    let mut macros = vec![(INSTANCE_MACRO, instance)];
    let mut extra = match replica {
        Some(r) => {
            macros.extend([("shard", "01"), ("replica", r.name)]);
            format!(
                r#"
    <zookeeper>
        <node><host>127.0.0.1</host><port>{}</port></node>
        <session_timeout_ms>10000</session_timeout_ms>
    </zookeeper>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>{}</interserver_http_port>"#,
                r.zookeeper_port, r.interserver_port
            )
        }
        None => String::new(),
    };
    if after_power_loss {
        // ClickHouse refuses to attach a table with more than 10 broken
        // parts; after a power cut every part written since the last fsync
        // is broken. The audit's own repair restores their rows.
        extra.push_str(
            "\n    <merge_tree>\n        <max_suspicious_broken_parts>1000000</max_suspicious_broken_parts>\n    </merge_tree>",
        );
    }
    let server = clickhouse_config::Server {
        dir,
        http_port,
        tcp_port,
        writer: "the test harness (testkit)",
        macros: &macros,
        extra: &extra,
    };
    clickhouse_config::write(&server, None, "default").context("writing the ClickHouse config")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_stops_and_keeps_data() {
        let mut server = ClickHouseServer::start().await.unwrap();
        let version = server.version().await.unwrap();
        assert!(
            version.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{version}"
        );
        if server.is_external() {
            return;
        }
        let db = server.unique_database("testkit");
        server
            .query_text(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        server
            .query_text(&format!(
                "CREATE TABLE {db}.t (x UInt32) ENGINE = MergeTree() ORDER BY x"
            ))
            .await
            .unwrap();
        server
            .query_text(&format!("INSERT INTO {db}.t VALUES (1), (2)"))
            .await
            .unwrap();
        server.stop().unwrap();
        assert!(server.query_text("SELECT 1").await.is_err());
        server.start_again().await.unwrap();
        assert_eq!(
            server
                .query_text(&format!("SELECT sum(x) FROM {db}.t"))
                .await
                .unwrap(),
            "3\n"
        );
        assert_eq!(
            server
                .wait_for_rows(&format!("{db}.t"), 2, Duration::from_secs(5))
                .await
                .unwrap(),
            2
        );
    }

    #[tokio::test]
    async fn two_replicas_share_a_replicated_table_through_zookeeper() {
        let zookeeper = crate::ZooKeeperServer::start().await.unwrap();
        let one = ClickHouseServer::start_replica(&zookeeper, "r1")
            .await
            .unwrap();
        let two = ClickHouseServer::start_replica(&zookeeper, "r2")
            .await
            .unwrap();
        for server in [&one, &two] {
            server
                .query_text(
                    "CREATE TABLE default.t (x UInt32) ENGINE = \
                     ReplicatedMergeTree('/clickhouse/tables/{shard}/default/t', '{replica}') ORDER BY x",
                )
                .await
                .unwrap();
        }
        one.query_text("INSERT INTO default.t VALUES (1), (2)")
            .await
            .unwrap();
        assert_eq!(
            two.wait_for_rows("default.t", 2, Duration::from_secs(30))
                .await
                .unwrap(),
            2
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_in_the_servers_words() {
        let mut server = ClickHouseServer::start().await.unwrap();
        let Some(port) = server.tcp_port() else {
            return;
        };
        server.stop().unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        // What `start` retries on when another process took a port first.
        let error = format!("{:#}", server.start_again().await.unwrap_err());
        assert!(
            error.to_lowercase().contains("address already in use"),
            "{error}"
        );
    }
}

//! `meshctl up --clickhouse-replicas N`: ZooKeeper and N ClickHouse
//! replicas of one shard on this machine instead of one ClickHouse.
//!
//! ZooKeeper (Debian's `zookeeper`: `scripts/install-deps.sh --replicated`)
//! runs standalone as process `zookeeper`, data under
//! `.agentmesh/zookeeper`, client port 2181 when free
//! (`AGENTMESH_ZOOKEEPER_PORT` picks another). Replica 1 is
//! `clickhouse-server` at `CLICKHOUSE_URL` (port 8123 by default), replica
//! `i` is `clickhouse-server-<i>` on the next HTTP port; each has its files
//! under `.agentmesh/clickhouse-replica-<i>`, the macros `{shard}` = `01`
//! and `{replica}` = `ch-<i>`, and an interserver HTTP port of its own. The
//! audit tables are created replicated on each, and the audit sink gets
//! every replica's URL and `--clickhouse-replicated`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Auth, Started, line};
use crate::procs::{self, Home};
use crate::servers::{self, Endpoints};

/// The most replicas `up` starts.
pub(crate) const MAX_REPLICAS: usize = 3;
/// Where Debian's `zookeeper` package puts the server's jar.
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// The process name of replica `i` (1-based): `clickhouse-server` for the
/// first, so `down`, `status` and every command find it as before.
pub(crate) fn process_name(i: usize) -> &'static str {
    match i {
        1 => "clickhouse-server",
        2 => "clickhouse-server-2",
        _ => "clickhouse-server-3",
    }
}

/// The HTTP URLs of `replicas` replicas: the first is `CLICKHOUSE_URL`, the
/// others on the ports after it. One replica: `CLICKHOUSE_URL` alone.
pub(crate) fn urls(endpoints: &Endpoints, replicas: usize) -> anyhow::Result<Vec<String>> {
    if replicas <= 1 {
        return Ok(vec![endpoints.clickhouse_url.clone()]);
    }
    let Some(port) = servers::loopback_port(&endpoints.clickhouse_url, 8123) else {
        bail!(
            "--clickhouse-replicas starts the replicas on this machine, but CLICKHOUSE_URL ({}) is not local: unset it",
            endpoints.clickhouse_url
        );
    };
    Ok((0..replicas)
        .map(|i| format!("http://127.0.0.1:{}", port + i as u16))
        .collect())
}

/// These endpoints pointed at `url`.
fn at(endpoints: &Endpoints, url: &str) -> Endpoints {
    let mut endpoints = endpoints.clone();
    endpoints.clickhouse_url = url.to_owned();
    endpoints
}

/// Makes sure ZooKeeper and `replicas` ClickHouse replicas run, starting
/// what does not.
pub(super) async fn ensure(
    home: &Home,
    endpoints: &Endpoints,
    replicas: usize,
    auth: Option<&Auth>,
    started: &mut Started,
) -> anyhow::Result<()> {
    if !(2..=MAX_REPLICAS).contains(&replicas) {
        bail!("--clickhouse-replicas {replicas}: 1 to {MAX_REPLICAS}");
    }
    let urls = urls(endpoints, replicas)?;
    let zookeeper_port = ensure_zookeeper(home, started).await?;
    let users = auth.and_then(|a| a.clickhouse.as_ref());
    for (i, url) in urls.iter().enumerate() {
        let i = i + 1;
        let name = process_name(i);
        let replica = format!("ch-{i}");
        let here = at(endpoints, url);
        let client = here.clickhouse();
        if let Some(version) = servers::clickhouse_version(&client).await {
            let macro_of = client
                .query("SELECT substitution FROM system.macros WHERE macro = 'replica'")
                .fetch_optional::<String>()
                .await
                .ok()
                .flatten();
            if macro_of.as_deref() != Some(replica.as_str()) {
                bail!(
                    "a ClickHouse that is not replica `{replica}` answers at {url}: stop it (`meshctl down`) and run `meshctl up --clickhouse-replicas {replicas}` again"
                );
            }
            line(
                name,
                "running",
                format_args!("{url}, ClickHouse {version}, replica {replica}"),
            );
            continue;
        }
        let port = servers::loopback_port(url, 8123).context("a replica's URL is local")?;
        let interserver = free_port()?;
        let extra = format!(
            r#"
    <zookeeper>
        <node><host>127.0.0.1</host><port>{zookeeper_port}</port></node>
    </zookeeper>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>{interserver}</interserver_http_port>
    <macros>
        <shard>01</shard>
        <replica>{replica}</replica>
    </macros>"#
        );
        let dir = format!("clickhouse-replica-{i}");
        let (child, tcp_port) =
            servers::start_clickhouse_as(home, &here, name, &dir, port, users, &extra).await?;
        line(
            name,
            "started",
            format_args!(
                "{url}, replica {replica} (native port {tcp_port}, interserver {interserver}, pid {}, log {})",
                child.id(),
                home.log_file(name).display()
            ),
        );
        started.children.push((name, child));
    }
    Ok(())
}

/// A free port on 127.0.0.1.
fn free_port() -> anyhow::Result<u16> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("finding a free port on 127.0.0.1")
}

/// ZooKeeper's client port: the running one's (from its `zoo.cfg`), else a
/// new server's. Returns the port.
async fn ensure_zookeeper(home: &Home, started: &mut Started) -> anyhow::Result<u16> {
    let dir = home.root().join("zookeeper");
    let config = dir.join("zoo.cfg");
    if procs::read_pid(home, "zookeeper").is_some_and(|r| procs::is_running(&r))
        && let Some(port) = configured_port(&config)
        && serving(port).await
    {
        line("zookeeper", "running", format_args!("127.0.0.1:{port}"));
        return Ok(port);
    }
    let (java, jar) = zookeeper_programs()?;
    let (port, data) = write_zookeeper_config(&dir, &config)?;
    let args = vec![
        format!("-Dzookeeper.log.dir={}", data.display()),
        "-Xmx256m".to_owned(),
        "-cp".to_owned(),
        jar.display().to_string(),
        "org.apache.zookeeper.server.ZooKeeperServerMain".to_owned(),
        config.display().to_string(),
    ];
    let mut child = procs::spawn(home, "zookeeper", &java, &args)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serving(port).await {
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(home.pid_file("zookeeper"));
            bail!(
                "`zookeeper` exited ({status}) while starting; its log ({}) ends with:\n{}",
                home.log_file("zookeeper").display(),
                procs::log_tail(home, "zookeeper", 2000)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!(
                "`zookeeper` did not serve within 60 s; see {}",
                home.log_file("zookeeper").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    line(
        "zookeeper",
        "started",
        format_args!(
            "127.0.0.1:{port} (pid {}, log {})",
            child.id(),
            home.log_file("zookeeper").display()
        ),
    );
    started.children.push(("zookeeper", child));
    Ok(port)
}

/// `java` and ZooKeeper's jar, or what to install.
fn zookeeper_programs() -> anyhow::Result<(PathBuf, PathBuf)> {
    let jar = std::env::var_os("ZOOKEEPER_JAR")
        .map_or_else(|| PathBuf::from(ZOOKEEPER_JAR), PathBuf::from);
    if !jar.is_file() {
        bail!(
            "ZooKeeper is not installed (`{}` is missing): run `scripts/install-deps.sh --replicated` (or `sudo apt-get install zookeeper`), or set ZOOKEEPER_JAR",
            jar.display()
        );
    }
    let java = procs::find_on_path("java")
        .context("`java` is not installed: `sudo apt-get install default-jre-headless`")?;
    Ok((java, jar))
}

/// Writes `config` (`zoo.cfg`) for a new ZooKeeper with its data under
/// `dir`, on `AGENTMESH_ZOOKEEPER_PORT` (default 2181) or, when that is
/// taken, a free port. Returns the port and the data directory.
fn write_zookeeper_config(
    dir: &std::path::Path,
    config: &std::path::Path,
) -> anyhow::Result<(u16, PathBuf)> {
    let wanted = std::env::var("AGENTMESH_ZOOKEEPER_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(2181);
    let port = if servers::port_free(wanted) {
        wanted
    } else {
        free_port()?
    };
    let data = dir.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating `{}`", data.display()))?;
    let data = std::fs::canonicalize(&data)?;
    std::fs::write(
        config,
        format!(
            "# Written by `meshctl up --clickhouse-replicas`; rewritten on every start.\n\
             tickTime=2000\n\
             dataDir={}\n\
             clientPort={port}\n\
             clientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n\
             4lw.commands.whitelist=ruok,srvr,stat\n",
            data.display()
        ),
    )
    .with_context(|| format!("writing `{}`", config.display()))?;
    Ok((port, data))
}

/// The `clientPort` of a `zoo.cfg`.
fn configured_port(config: &std::path::Path) -> Option<u16> {
    std::fs::read_to_string(config)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("clientPort=")?.trim().parse().ok())
}

/// Whether the ZooKeeper on `port` serves (`srvr` names its mode).
pub(crate) async fn serving(port: u16) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream.write_all(b"srvr").await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
        .is_some_and(|answer| answer.contains("Mode: "))
}

/// Creates the audit tables replicated on every replica.
pub(super) async fn apply_schema(endpoints: &Endpoints, replicas: usize) -> anyhow::Result<String> {
    let engine = audit_tables::schema::Engine::Replicated { on_cluster: None };
    let mut version = String::new();
    for url in urls(endpoints, replicas)? {
        let client = at(endpoints, &url).clickhouse();
        let features = audit_tables::schema::ensure_with(&client, &endpoints.database, 0, &engine)
            .await
            .with_context(|| format!("creating the replicated audit schema at {url}"))?;
        version = features.version;
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_take_the_ports_after_the_first() {
        let endpoints = Endpoints {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_credentials: broker_config::NatsCredentials::default(),
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_user: "default".into(),
            clickhouse_password: String::new(),
            database: "agentmesh".into(),
        };
        assert_eq!(urls(&endpoints, 1).unwrap(), ["http://127.0.0.1:8123"]);
        assert_eq!(
            urls(&endpoints, 2).unwrap(),
            ["http://127.0.0.1:8123", "http://127.0.0.1:8124"]
        );
        let remote = Endpoints {
            clickhouse_url: "http://ch.example:8123".into(),
            ..endpoints
        };
        assert!(urls(&remote, 2).is_err());
        assert_eq!(process_name(1), "clickhouse-server");
        assert_eq!(process_name(2), "clickhouse-server-2");
    }
}

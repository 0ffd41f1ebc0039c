//! A standalone ZooKeeper of the test's own, for replicated ClickHouse
//! ([`crate::ClickHouseServer::start_replica`]): `zoo.cfg` and data in a
//! temporary directory, a free client port on 127.0.0.1, no admin server,
//! started with `java` on Debian's `zookeeper` package
//! (`/usr/share/java/zookeeper.jar`), ready once the `srvr` four-letter word
//! says it serves (`Mode: standalone`), killed on drop.
//!
//! `ZOOKEEPER_JAR` overrides the jar, `JAVA` the Java binary. The package is
//! installed by `scripts/install-deps.sh` with `AGENTMESH_REPLICATED=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{WAIT, free_port, log_tail, until_ready};

/// Where Debian's `zookeeper` package puts the server's jar (its manifest
/// names the libraries it needs).
const DEBIAN_JAR: &str = "/usr/share/java/zookeeper.jar";

/// A ZooKeeper server for one test.
pub struct ZooKeeperServer {
    child: Option<Child>,
    port: u16,
    java: PathBuf,
    jar: PathBuf,
    dir: tempfile::TempDir,
}

impl ZooKeeperServer {
    /// Starts a fresh standalone server on a free port and waits until it
    /// serves.
    pub async fn start() -> anyhow::Result<Self> {
        let jar = std::env::var_os("ZOOKEEPER_JAR")
            .map_or_else(|| PathBuf::from(DEBIAN_JAR), PathBuf::from);
        if !jar.is_file() {
            bail!(
                "`{}` not found: install ZooKeeper (`AGENTMESH_REPLICATED=1 scripts/install-deps.sh`, or `apt-get install zookeeper`) or set `ZOOKEEPER_JAR`",
                jar.display()
            );
        }
        let java = crate::find_binary("java", "JAVA", "default-jre-headless")?;
        let mut attempt = 1;
        loop {
            let dir = tempfile::tempdir().context("creating the ZooKeeper directory")?;
            let port = free_port()?;
            write_config(dir.path(), port)?;
            let mut server = Self {
                child: None,
                port,
                java: java.clone(),
                jar: jar.clone(),
                dir,
            };
            match server.start_again().await {
                Ok(()) => return Ok(server),
                Err(_) if attempt < 3 && server.port_was_taken() => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("zookeeper.log")
    }

    /// Kills the server (SIGKILL) and waits for it to exit; port and data
    /// stay for [`ZooKeeperServer::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data (when it is not
    /// running) and waits until it serves.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let log = self.log_path();
        if self.child.is_none() {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            let err = out.try_clone().context("duplicating the log handle")?;
            let child = Command::new(&self.java)
                .arg(format!("-Dzookeeper.log.dir={}", self.dir.path().display()))
                .arg("-Xmx256m")
                .arg("-cp")
                .arg(&self.jar)
                .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
                .arg(self.dir.path().join("zoo.cfg"))
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .with_context(|| format!("starting `{}`", self.java.display()))?;
            self.child = Some(child);
        }
        let port = self.port;
        let ready = until_ready(
            self.child.as_mut(),
            WAIT,
            &format!("ZooKeeper on port {port} serving"),
            || format!("{}:\n{}", log.display(), log_tail(&log)),
            || async move {
                four_letter_word(port, "srvr")
                    .await
                    .filter(|answer| answer.contains("Mode: "))
                    .map(|_| ())
            },
        )
        .await
        .context("zookeeper");
        if self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            self.child = None;
        }
        ready
    }

    /// Whether the server's log says its port was taken.
    fn port_was_taken(&self) -> bool {
        std::fs::read_to_string(self.log_path())
            .is_ok_and(|log| log.to_lowercase().contains("address already in use"))
    }
}

impl Drop for ZooKeeperServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends a four-letter word (`ruok`, `srvr`, `stat`) to the ZooKeeper on
/// `port` and returns its answer; `None` when it does not answer.
pub async fn four_letter_word(port: u16, word: &str) -> Option<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream.write_all(word.as_bytes()).await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// Writes `zoo.cfg` for a standalone server on 127.0.0.1:`port` with its
/// data under `dir`; `ruok`, `srvr` and `stat` allowed.
fn write_config(dir: &Path, port: u16) -> anyhow::Result<()> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let config = format!(
        "tickTime=500\n\
         initLimit=10\n\
         syncLimit=5\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=ruok,srvr,stat\n",
        data.display()
    );
    std::fs::write(dir.join("zoo.cfg"), config).context("writing zoo.cfg")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_stops_and_serves_again_on_its_port() {
        let mut zk = ZooKeeperServer::start().await.unwrap();
        let port = zk.port();
        assert_eq!(
            four_letter_word(port, "ruok").await.as_deref(),
            Some("imok")
        );
        zk.stop();
        assert_eq!(four_letter_word(port, "ruok").await, None);
        zk.start_again().await.unwrap();
        assert!(
            four_letter_word(port, "srvr")
                .await
                .is_some_and(|s| s.contains("Mode: standalone"))
        );
    }
}

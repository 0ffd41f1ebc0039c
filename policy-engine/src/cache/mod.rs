//! What the tool-result cache needs to know without the broker: which
//! tools may be answered from the cache (`cache.toml`, loaded with the
//! policies) and the canonical form of a call's arguments its keys are
//! computed from. The bucket's key layout and the cached answer's id are
//! the contract's (`schemas::cache`); the lookups are the worker's.

mod canon;
mod rules;

pub use canon::canonical;
pub use rules::{CACHE_FILE, CacheRules, Scope, ToolRule};

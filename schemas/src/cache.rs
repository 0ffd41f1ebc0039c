//! The tool-result cache on the wire (`docs/cache.md`): where a tool's
//! results live in the KV bucket `mesh-tool-cache` (`r.<tool token>.<key
//! hash>`, so one tool's results can be purged by a filter) and the id of
//! a cached answer, which the audit derives from the call alone.

use sha2::{Digest, Sha256};

use crate::subjects;

/// The first `len` hex digits of SHA-256 over `text`.
fn sha_hex(text: &str, len: usize) -> String {
    let mut hex = hex::encode(Sha256::digest(text.as_bytes()));
    hex.truncate(len);
    hex
}

/// The token that stands for `tool` in result keys (a tool name may hold
/// characters a key may not).
pub fn tool_token(tool: &str) -> String {
    sha_hex(&format!("tool\n{tool}"), 16)
}

/// The filter of every result of `tool` in `mesh-tool-cache` (all results
/// and in-flight records when `None`).
pub fn purge_filter(tool: Option<&str>) -> String {
    let bucket = subjects::BUCKET_TOOL_CACHE;
    match tool {
        Some(tool) => format!("$KV.{bucket}.r.{}.*", tool_token(tool)),
        None => format!("$KV.{bucket}.>"),
    }
}

/// The filter of every result in `mesh-tool-cache` (not the records of
/// calls in flight): one subject per result.
pub fn results_filter() -> String {
    format!("$KV.{}.r.>", subjects::BUCKET_TOOL_CACHE)
}

/// The id of the cached answer to call `call_id` of `caller`: a UUIDv5 of
/// the call, so a redelivered call gets the same id and the audit can name
/// the answer (which is not an ingress event) from the call alone.
pub fn answer_id(caller: &str, call_id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!(
            "agentmesh:cache-hit:{}",
            subjects::event_key(caller, call_id)
        )
        .as_bytes(),
    )
    .to_string()
}

//! `meshctl cache`: the policy worker's tool-result cache in the KV bucket
//! `mesh-tool-cache` (`docs/cache.md`) — how big it is, and purging it,
//! whole or one tool's results.

use anyhow::Context;
use async_nats::jetstream;
use clap::Subcommand;
use schemas::subjects;

use crate::servers::Endpoints;

/// `meshctl cache ...`
#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// Show how many entries and bytes the cache holds, and its limits.
    Status {
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Drop cached results: every tool's (and the calls in flight), or one tool's with --tool.
    Purge {
        /// Only this tool's results (e.g. `code.search`).
        #[arg(long)]
        tool: Option<String>,
    },
}

/// Runs a `meshctl cache` command.
pub(crate) async fn run(command: CacheCommand, endpoints: &Endpoints) -> anyhow::Result<bool> {
    let js = jetstream::new(endpoints.connect_nats().await?);
    let stream_name = format!("KV_{}", subjects::BUCKET_TOOL_CACHE);
    let context = || {
        format!(
            "KV bucket `{}` (the policy worker creates it at start; is it running?)",
            subjects::BUCKET_TOOL_CACHE
        )
    };
    match command {
        CacheCommand::Status { output } => {
            let mut stream = js.get_stream(&stream_name).await.with_context(context)?;
            let info = stream.info().await.with_context(context)?.clone();
            let (entries, bytes) = broker_config::admin::tool_cache_size(&stream)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(context)?;
            let limit = |n: i64| {
                if n < 0 {
                    "unlimited".to_owned()
                } else {
                    n.to_string()
                }
            };
            if output.json() {
                crate::output::print_json(&serde_json::json!({
                    "bucket": subjects::BUCKET_TOOL_CACHE,
                    "entries": entries,
                    "bytes": bytes,
                    "max_bytes": (info.config.max_bytes >= 0).then_some(info.config.max_bytes),
                    "max_age_secs": info.config.max_age.as_secs(),
                }))?;
                return Ok(true);
            }
            outln!(
                "{}: {entries} entries, {bytes} bytes (max {} bytes, oldest evicted first; max age {}s)",
                subjects::BUCKET_TOOL_CACHE,
                limit(info.config.max_bytes),
                info.config.max_age.as_secs()
            );
        }
        CacheCommand::Purge { tool } => {
            let purged = broker_config::admin::purge_tool_cache(&js, tool.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(context)?;
            match tool {
                Some(tool) => outln!(
                    "Purged {purged} cached results of `{tool}`: its next calls go to the tool."
                ),
                None => outln!(
                    "Purged the tool cache ({purged} messages): every tool's next calls go to the tool."
                ),
            }
        }
    }
    Ok(true)
}

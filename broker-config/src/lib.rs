//! The JetStream streams and KV buckets of `docs/contract.md`, and the one function
//! every service calls at start to make the broker match them.
//!
//! [`apply`] is idempotent: it creates what is missing, updates what differs
//! in the settings agentmesh owns, and never deletes a stream, a bucket or a
//! message.
//!
//! Identities and permissions live here too: [`auth`] holds the per-role
//! permission templates and renders the nats-server authorization config,
//! [`credentials`] makes and reads nkeys, and the `provision_*` functions
//! create the durable consumers that agents may not create themselves.

pub mod admin;
pub mod auth;
pub mod credentials;
pub mod mcp_tokens;
mod provision;
pub mod server;

pub use credentials::{DEFAULT_NATS_URL, NatsArgs, NatsCredentials};
pub use provision::{
    ProvisionError, agent_calls_consumer_config, agent_consumer_config, approvals_consumer_config,
    audit_chain_consumer_config, ensure_consumer, provision_agent, provision_services,
    receipts_consumer_config, remove_agent, service_consumer_configs,
};

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use schemas::subjects;

/// Settings that vary between deployments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Replicas of every stream and bucket (1 for one server, 3 for a cluster).
    pub replicas: usize,
    /// How long events are kept in every `MESH_*` stream (but
    /// `MESH_AUDIT`, kept for good).
    pub max_age: Duration,
    /// Whether an existing stream keeps the `max_age` it has (`true`: a
    /// service started without `--stream-max-age-days` neither shortens
    /// nor lengthens what an operator set; only a stream it creates gets
    /// [`Options::max_age`]) or is moved to [`Options::max_age`].
    pub keep_existing_max_age: bool,
    /// Window within which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Largest size of the tool-result cache bucket (`mesh-tool-cache`):
    /// past it, the oldest writes are evicted first.
    pub tool_cache_max_bytes: i64,
    /// Longest life of anything in `mesh-tool-cache`, whatever a tool's TTL.
    pub tool_cache_max_age: Duration,
    /// Most consumers on each `MESH_*` stream and each KV bucket's stream
    /// (`KV_<bucket>`). Every registered agent has its own durable
    /// consumers on `MESH_DELIVER`, `MESH_CALL` and `MESH_DECISION`, so
    /// this bounds the agents a mesh can register; every watcher of a
    /// bucket is an ordered consumer on its stream.
    /// It is set explicitly because a stream without it takes the server's
    /// default, which nats-server 2.15 sets to 1,000
    /// (`jetstream { limits { default_max_consumers } }`). An existing
    /// stream without a limit (0 or -1, made by an older agentmesh) is moved
    /// to it; a positive value an operator set is kept.
    pub max_consumers: i32,
}

/// The default [`Options::max_consumers`]: room for 100,000 agents (less the
/// few service consumers), ten times the largest mesh measured
/// (`mesh-bench idle-agents`, docs/performance.md), yet still a bound on a
/// runaway registration loop.
pub const DEFAULT_MAX_CONSUMERS: i32 = 100_000;

impl Default for Options {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            keep_existing_max_age: false,
            duplicate_window: Duration::from_secs(10 * 60),
            tool_cache_max_bytes: 256 * 1024 * 1024,
            tool_cache_max_age: Duration::from_secs(24 * 3600),
            max_consumers: DEFAULT_MAX_CONSUMERS,
        }
    }
}

impl Options {
    /// The services' `--stream-max-age-days`: with a value, every `MESH_*`
    /// stream (but `MESH_AUDIT`) keeps events that many days, existing
    /// ones moved to it; without, a stream created now gets the default
    /// (7 days) and an existing one keeps what it has.
    pub fn with_max_age_days(self, days: Option<u64>) -> Self {
        match days {
            Some(days) => Self {
                max_age: Duration::from_secs(days.saturating_mul(24 * 3600)),
                keep_existing_max_age: false,
                ..self
            },
            None => Self {
                keep_existing_max_age: true,
                ..self
            },
        }
    }
}

/// What becomes of the original of an event that an `@redact` allow
/// delivered redacted (`docs/guardrails.md`, "Redaction"): the policy
/// worker and the audit sink read the same setting
/// (`AGENTMESH_REDACTED_ORIGINAL`), and both must say the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RedactedOriginal {
    /// The original stays in `MESH_INGRESS` (until its `max_age`) and the
    /// audit's `events` row keeps it whole.
    #[default]
    Keep,
    /// Kept nowhere: the worker erases it from `MESH_INGRESS` once the
    /// redacted copies are stored, and the audit sink writes no event row
    /// before the worker decided the event, so the row of an erased event
    /// has no data.
    Drop,
}

impl RedactedOriginal {
    /// The environment variable both services read it from.
    pub const ENV: &'static str = "AGENTMESH_REDACTED_ORIGINAL";

    /// The setting of [`RedactedOriginal::ENV`] in this process's
    /// environment (unset or empty: `keep`).
    ///
    /// # Errors
    /// The variable holds something else than `keep` or `drop`.
    pub fn from_env() -> Result<Self, String> {
        let value = std::env::var(Self::ENV).unwrap_or_default();
        match value.trim() {
            "" => Ok(Self::Keep),
            v => <Self as clap::ValueEnum>::from_str(v, true)
                .map_err(|_| format!("{} is `{v}`: say `keep` or `drop`", Self::ENV)),
        }
    }

    /// Its name as the flag takes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Drop => "drop",
        }
    }
}

/// What [`apply`] did to one stream or bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It did not exist and was created.
    Created,
    /// It existed with other settings and was updated.
    Updated,
    /// It already matched.
    Unchanged,
}

/// Why the broker could not be brought in line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A stream could not be read, created or updated.
    #[error("stream `{stream}`: {source} (is JetStream enabled? start nats-server with `-js`)")]
    Stream {
        /// The stream name.
        stream: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
    /// A KV bucket could not be read or created.
    #[error("KV bucket `{bucket}`: {source} (is JetStream enabled? start nats-server with `-js`)")]
    Bucket {
        /// The bucket name.
        bucket: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
}

/// The stream definitions of `docs/contract.md` for these options.
pub fn streams(options: &Options) -> Vec<stream::Config> {
    let def = |name: &str, subject: &str, description: &str| stream::Config {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        subjects: vec![subject.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        max_age: options.max_age,
        duplicate_window: options.duplicate_window,
        discard: stream::DiscardPolicy::Old,
        max_consumers: options.max_consumers,
        ..Default::default()
    };
    vec![
        def(
            subjects::STREAM_INGRESS,
            subjects::INGRESS_ALL,
            "every event agents publish, before policy",
        ),
        def(
            subjects::STREAM_DELIVER,
            subjects::DELIVER_ALL,
            "approved events, by target and source",
        ),
        def(
            subjects::STREAM_CALL,
            subjects::CALL_ALL,
            "approved tool calls, by target and source (also delivered on mesh.deliver)",
        ),
        def(
            subjects::STREAM_DECISION,
            subjects::DECISION_ALL,
            "one decision receipt per ingress event",
        ),
        def(
            subjects::STREAM_DEAD,
            subjects::DEAD_ALL,
            "denied and invalid events with the reason",
        ),
        def(
            subjects::STREAM_GPU,
            subjects::GPU_LEASE_ALL,
            "GPU lease grants and releases",
        ),
        def(
            subjects::STREAM_APPROVALS,
            subjects::APPROVAL_ALL,
            "events parked for human approval, and the answers",
        ),
        // The audit's external record: kept for good, and no message may
        // be deleted or the stream purged (only a stream update by the
        // operator could change that, and `meshctl audit verify` then
        // sees a checkpoint chain broken).
        stream::Config {
            max_age: Duration::ZERO,
            deny_delete: true,
            deny_purge: true,
            ..def(
                subjects::STREAM_AUDIT,
                subjects::AUDIT_CHECKPOINTS,
                "signed audit checkpoints over MESH_DECISION, one chain per sink signer",
            )
        },
    ]
}

/// The KV bucket definitions of `docs/contract.md` for these options, as the
/// streams that back them (`KV_<bucket>`, laid out as the JetStream KV
/// design specifies).
///
/// The buckets are created as streams rather than through
/// `create_key_value`, because that call first reads the account info, which
/// this client cannot parse from nats-server 2.9; the resulting bucket is the
/// same and opens with `get_key_value`.
pub fn buckets(options: &Options) -> Vec<stream::Config> {
    let kv = |bucket: &str, description: &str, history: i64, max_age: Duration| stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        // Every watcher of a bucket (`nats kv watch`, a client's
        // `watch()`: an ordered consumer each) counts against it, as the
        // agents' durables count against the `MESH_*` streams'.
        max_consumers: options.max_consumers,
        ..Default::default()
    };
    let forever = Duration::ZERO;
    vec![
        kv(
            subjects::BUCKET_AGENTS,
            "agent cards, key = agent id",
            5,
            forever,
        ),
        kv(
            subjects::BUCKET_SIGNERS,
            "trusted decision signers, key = public key (operator only)",
            10,
            forever,
        ),
        kv(
            subjects::BUCKET_GPU_LEASES,
            "GPU leases, one key per leased GPU",
            10,
            forever,
        ),
        // Counters of a workflow nobody touched for `max_age` are dropped;
        // the agent counters' longest window is a day.
        kv(
            subjects::BUCKET_LIMITS,
            "rate and budget counters: agent.<agent>, workflow.<trace id>",
            1,
            options.max_age,
        ),
        // A workflow's labels outlive its last step by `max_age`; one that
        // expired is a new workflow to the policies (docs/guardrails.md).
        kv(
            subjects::BUCKET_FLOWS,
            "workflow labels and steps, key = trace id",
            1,
            options.max_age,
        ),
        kv(
            subjects::BUCKET_APPROVALS,
            "approval requests and their state, key = approval id",
            5,
            options.max_age,
        ),
        // A cache, not a record: bounded in bytes, and when full the oldest
        // writes go first (discard old), so filling it never fails.
        stream::Config {
            max_bytes: options.tool_cache_max_bytes,
            max_message_size: TOOL_CACHE_MAX_VALUE,
            discard: stream::DiscardPolicy::Old,
            ..kv(
                subjects::BUCKET_TOOL_CACHE,
                "tool-result cache: r.<tool>.<key> results, p.<call> pending calls, f.<key> calls in flight",
                1,
                options.tool_cache_max_age,
            )
        },
    ]
}

/// The largest message stored in `mesh-tool-cache` (one cached result with
/// its metadata, base64): a result larger than this is not cached.
pub const TOOL_CACHE_MAX_VALUE: i32 = 2 * 1024 * 1024;

/// Whether `current` already has every setting agentmesh owns in `wanted`.
fn matches(current: &stream::Config, wanted: &stream::Config) -> bool {
    current.subjects == wanted.subjects
        && current.retention == wanted.retention
        && current.num_replicas == wanted.num_replicas
        && current.max_age == wanted.max_age
        && current.duplicate_window == wanted.duplicate_window
        && current.discard == wanted.discard
        && current.description == wanted.description
        && current.max_consumers == wanted.max_consumers
}

/// Brings the broker in line with the definitions: creates missing streams
/// and buckets, updates streams whose owned settings differ (keeping every
/// other setting and all data), gives an existing bucket without a
/// consumer limit [`Options::max_consumers`], and returns what changed, by
/// name.
pub async fn apply(
    js: &jetstream::Context,
    options: &Options,
) -> Result<Vec<(String, Change)>, ApplyError> {
    let mut changes = Vec::new();
    for wanted in streams(options) {
        let name = wanted.name.clone();
        let err = |source: async_nats::Error| ApplyError::Stream {
            stream: name.clone(),
            source,
        };
        let keep_max_age = options.keep_existing_max_age && wanted.max_age == options.max_age;
        let change = apply_stream(js, wanted, keep_max_age).await.map_err(err)?;
        changes.push((name, change));
    }
    for wanted in buckets(options) {
        let bucket = wanted.name.trim_start_matches("KV_").to_owned();
        let err = |source: async_nats::Error| ApplyError::Bucket {
            bucket: bucket.clone(),
            source,
        };
        let change = match find_stream(js, &wanted.name)
            .await
            .map_err(|e| err(e.into()))?
        {
            Some(mut existing) => apply_bucket_limit(js, &mut existing, wanted.max_consumers)
                .await
                .map_err(err)?,
            None => match js.create_stream(wanted.clone()).await {
                Ok(_) => {
                    tracing::info!(%bucket, "KV bucket created.");
                    Change::Created
                }
                // Another service applying at the same moment created it.
                Err(_) if find_stream(js, &wanted.name).await.ok().flatten().is_some() => {
                    Change::Unchanged
                }
                Err(e) => return Err(err(e.into())),
            },
        };
        changes.push((bucket, change));
    }
    Ok(changes)
}

/// Creates `wanted` or brings the existing stream's owned settings in line.
///
/// Services start together and apply the same definitions: when a create
/// fails because another one created the stream a moment earlier (the
/// broker answers "already in use" or "subjects overlap"), the stream is
/// compared and updated like one that was there before.
/// With `keep_max_age`, an existing stream keeps its own `max_age`.
async fn apply_stream(
    js: &jetstream::Context,
    mut wanted: stream::Config,
    keep_max_age: bool,
) -> Result<Change, async_nats::Error> {
    let name = wanted.name.clone();
    let mut existing = match find_stream(js, &name).await? {
        Some(existing) => existing,
        None => match js.create_stream(wanted.clone()).await {
            Ok(_) => {
                tracing::info!(stream = %name, "Stream created.");
                return Ok(Change::Created);
            }
            Err(error) => match find_stream(js, &name).await? {
                Some(existing) => existing,
                None => return Err(error.into()),
            },
        },
    };
    let info = existing.info().await?;
    if keep_max_age {
        wanted.max_age = info.config.max_age;
    }
    // A positive limit is the operator's (or ours): kept. Only a stream
    // without one (0 or -1: the server's default, which may be as low as
    // 1,000) is moved to ours.
    if info.config.max_consumers > 0 {
        wanted.max_consumers = info.config.max_consumers;
    }
    if matches(&info.config, &wanted) {
        return Ok(Change::Unchanged);
    }
    // Keep whatever else an operator set (limits, placement, storage, which
    // cannot change in place) and only move the settings agentmesh owns.
    let updated = stream::Config {
        subjects: wanted.subjects.clone(),
        retention: wanted.retention,
        num_replicas: wanted.num_replicas,
        max_age: wanted.max_age,
        duplicate_window: wanted.duplicate_window,
        discard: wanted.discard,
        description: wanted.description.clone(),
        max_consumers: wanted.max_consumers,
        ..info.config.clone()
    };
    match js.update_stream(updated.clone()).await {
        Ok(_) => {}
        // Some servers refuse to change the limit of an existing stream:
        // warn, and move the other settings without it.
        Err(error) if updated.max_consumers != info.config.max_consumers => {
            tracing::warn!(
                stream = %name,
                current = info.config.max_consumers,
                wanted = updated.max_consumers,
                %error,
                "The broker refused to set the stream's max_consumers (nats-server 2.9 cannot change it \
                 on an existing stream); the stream keeps the server's default: no limit on 2.9, \
                 1,000 consumers (about 1,000 agents) on nats-server 2.15. Start the services once \
                 against nats-server 2.15 or later, which sets it, or raise \
                 `jetstream {{ limits {{ default_max_consumers }} }}` in the server config \
                 (docs/operations.md, \"Consumer limit\")."
            );
            wanted.max_consumers = info.config.max_consumers;
            if matches(&info.config, &wanted) {
                return Ok(Change::Unchanged);
            }
            js.update_stream(stream::Config {
                max_consumers: info.config.max_consumers,
                ..updated
            })
            .await?;
        }
        Err(error) => return Err(error.into()),
    }
    tracing::info!(stream = %name, "Stream settings updated.");
    Ok(Change::Updated)
}

/// Moves the stream of an existing bucket without a consumer limit (0 or
/// -1: made by an older agentmesh) to `limit`, keeping every other setting
/// and all its keys; a positive limit (ours, or an operator's) is kept.
/// Nothing else of an existing bucket is changed. A refused change
/// (nats-server 2.9 cannot change the limit of an existing stream; with
/// authorization only the operator may change a stream) leaves the bucket
/// as it is, with a warning: the service starts anyway.
async fn apply_bucket_limit(
    js: &jetstream::Context,
    existing: &mut stream::Stream,
    limit: i32,
) -> Result<Change, async_nats::Error> {
    let info = existing.info().await?;
    if info.config.max_consumers > 0 || limit <= 0 {
        return Ok(Change::Unchanged);
    }
    let name = info.config.name.clone();
    let updated = stream::Config {
        max_consumers: limit,
        ..info.config.clone()
    };
    match js.update_stream(updated).await {
        Ok(_) => {
            tracing::info!(stream = %name, limit, "KV bucket's consumer limit set.");
            Ok(Change::Updated)
        }
        Err(error) => {
            tracing::warn!(
                stream = %name,
                current = info.config.max_consumers,
                wanted = limit,
                %error,
                "The broker refused to set the KV bucket's max_consumers (nats-server 2.9 cannot change it \
                 on an existing stream; with authorization only the operator may, as `meshctl up` does); \
                 the bucket keeps the server's default: no limit on 2.9, 1,000 watchers on nats-server \
                 2.15. Run `meshctl up` (or start a service with the operator's key) against nats-server \
                 2.15 or later, which sets it (docs/operations.md, \"Consumer limit\")."
            );
            Ok(Change::Unchanged)
        }
    }
}

/// The stream called `name`, or `None` when the broker says it does not exist.
async fn find_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>, jetstream::context::GetStreamError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

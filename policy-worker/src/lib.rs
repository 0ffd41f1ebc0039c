//! The policy worker: a durable pull consumer on `MESH_INGRESS` that decides
//! every event with Cedar, publishes exactly one receipt per event, routes
//! approved events to their target byte for byte and dead-letters the rest.
//!
//! `main.rs` parses flags into a [`Config`] and calls [`run`]; tests start
//! the same `run` in-process.
//!
//! The decisions themselves — Cedar, payload detectors, the guardrail
//! records, replay — are `policy_engine`'s; the worker adds the broker
//! around them (`docs/guardrails.md`): rate and budget counters in
//! JetStream KV, a shadow policy set evaluated without effect, and human
//! approval for permits annotated `@approval("required")`.
//!
//! The tool-result cache (`docs/cache.md`, module `cache`) answers approved
//! calls of tools declared in `cache.toml` from JetStream KV. A tool call
//! whose arguments break the input schema in its tool's agent card is
//! invalid (module `cards`).

mod approval;
mod cache;
mod cards;
mod durability;
mod flows;
mod guard;
mod limits;
mod plan;
mod publish;
mod reload;
#[cfg(test)]
mod shape;
mod signing;
mod watermarks;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use policy_engine::{LoadError, PolicyBundle};

/// How often the consumer's lag is read for `agentmesh.consumer.pending`.
const LAG_POLL: Duration = Duration::from_secs(5);

/// Default policy directory.
pub const DEFAULT_POLICIES: &str = "policies";
/// Default durable consumer name on `MESH_INGRESS`.
pub const DEFAULT_CONSUMER: &str = "policy-worker";
/// Default number of messages requested per pull.
pub const DEFAULT_BATCH: usize = 256;
/// Default number of events decided and published at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 512;
/// Default most decisions signed under one Merkle root.
pub const DEFAULT_SIGN_BATCH: usize = 256;
/// Default longest time the signer collects decisions for one signature,
/// in microseconds: none. Measured (docs/performance.md, "Signing
/// window"), a 1 ms window added about 2 ms to the open loop's p50 and p99
/// at 2,000 events/s, while without one signing already costs under 5 µs
/// per event at 5,000 events/s: what is queued after the yield fills the
/// batch.
pub const DEFAULT_SIGN_WINDOW_US: u64 = 0;
/// Default JetStream ack wait, in seconds.
pub const DEFAULT_ACK_WAIT_SECS: u64 = 30;
/// Default wait of a parked event for its approval, in seconds.
pub const DEFAULT_APPROVAL_TIMEOUT_SECS: u64 = 3600;
/// Default wait of a cacheable call for an identical call in flight, in ms.
pub const DEFAULT_CACHE_FLIGHT_WAIT_MS: u64 = 10_000;
/// Default replicas of the `MESH_*` streams.
pub const DEFAULT_STREAM_REPLICAS: usize = 1;
/// How long in-flight events may take to finish at shutdown.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Everything the worker runs with: the `policy-worker` flags (and the
/// environment variables named), or [`Config::default`] and struct update
/// syntax in tests.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "policy-worker",
    version,
    about = "Decides every agentmesh ingress event with Cedar policies"
)]
pub struct Config {
    /// NATS URL and credentials.
    #[command(flatten)]
    pub nats: broker_config::NatsArgs,
    /// Policy directory: `schema.cedarschema`, `entities.json`, `*.cedar`.
    #[arg(long, env = "AGENTMESH_POLICIES", default_value = DEFAULT_POLICIES)]
    pub policies: PathBuf,
    /// Largest accepted event (headers + payload) in bytes.
    #[arg(long, env = "AGENTMESH_MAX_EVENT_BYTES", default_value_t = schemas::DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
    /// Durable consumer name on MESH_INGRESS (replicas share one name).
    #[arg(long, env = "AGENTMESH_WORKER_CONSUMER", default_value = DEFAULT_CONSUMER)]
    pub consumer: String,
    /// Messages requested per pull.
    #[arg(long, env = "AGENTMESH_WORKER_BATCH", default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Events decided and published concurrently.
    #[arg(long, env = "AGENTMESH_WORKER_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// The NATS nodes' monitoring endpoints (`http://host:port`, comma-separated): at start the worker reads from each whether it fsyncs every write (`agentmesh_nats_sync_always`, and a warning when not).
    #[arg(long, env = "NATS_MONITORING_URL", value_delimiter = ',')]
    pub nats_monitoring_url: Vec<String>,
    /// Seconds JetStream waits for an ack before redelivering an event.
    #[arg(long, env = "AGENTMESH_ACK_WAIT_SECS", default_value_t = DEFAULT_ACK_WAIT_SECS)]
    pub ack_wait_secs: u64,
    /// Watch the policy directory and reload on change (`--no-watch`:
    /// reload on SIGHUP only).
    #[arg(long = "no-watch", action = clap::ArgAction::SetFalse)]
    pub watch_policies: bool,
    /// Replicas of the MESH_* streams when they are created or updated.
    #[arg(long, env = "AGENTMESH_STREAM_REPLICAS", default_value_t = DEFAULT_STREAM_REPLICAS)]
    pub stream_replicas: usize,
    /// Days events are kept in the `MESH_*` streams (their `max_age`; `MESH_AUDIT` is kept for good). Unset: a stream this service creates gets 7 days and an existing one keeps what it has; every service should say the same.
    #[arg(long, env = "AGENTMESH_STREAM_MAX_AGE_DAYS")]
    pub stream_max_age_days: Option<u64>,
    /// File created once the worker is consuming, removed on exit.
    #[arg(long, env = "AGENTMESH_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Shadow policy directory: decided on every event without effect, recorded in receipts.
    #[arg(long, env = "AGENTMESH_SHADOW_POLICIES")]
    pub shadow_policies: Option<PathBuf>,
    /// Seconds an event parked for approval waits before it is denied.
    #[arg(long, env = "AGENTMESH_APPROVAL_TIMEOUT_SECS", default_value_t = DEFAULT_APPROVAL_TIMEOUT_SECS)]
    pub approval_timeout_secs: u64,
    /// Milliseconds a call of a cacheable tool waits for an identical call's result already in flight.
    #[arg(long, env = "AGENTMESH_CACHE_FLIGHT_WAIT_MS", default_value_t = DEFAULT_CACHE_FLIGHT_WAIT_MS)]
    pub cache_flight_wait_ms: u64,
    /// What becomes of the original of a redacted delivery: `keep` (in
    /// `MESH_INGRESS` and the audit's `events` row) or `drop` (erased from
    /// `MESH_INGRESS` once the redacted copies are stored; give the audit
    /// sink the same setting).
    #[arg(long, env = "AGENTMESH_REDACTED_ORIGINAL", value_enum, default_value_t = broker_config::RedactedOriginal::Keep)]
    pub redacted_original: broker_config::RedactedOriginal,
    /// How long in-flight events may take to finish at shutdown (no flag).
    #[arg(skip = DEFAULT_GRACE)]
    pub grace: Duration,
    /// Health and metrics server, log format, OTLP export.
    #[command(flatten)]
    pub ops: telemetry::OpsConfig,
    /// This replica's decision signing key: a file holding an nkey seed
    /// (mode 0600; `meshctl up` writes `.agentmesh/auth/signing/policy-worker.nk`).
    /// Without it (and without `signing_key`), a key for this run only,
    /// which the worker adds to `mesh-signers` where the broker lets it
    /// (development stacks without authorization).
    #[arg(long, env = "AGENTMESH_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// The signing key itself, for a worker started in-process (no flag;
    /// takes precedence over `signing_key_file`).
    #[arg(skip)]
    pub signing_key: Option<Arc<schemas::signing::SigningKey>>,
    /// Most decisions signed together (`docs/security.md`, "Batch
    /// signatures"): the signer takes whatever decisions are waiting, up
    /// to this many, and signs one Merkle root for them; a decision that
    /// waits alone is signed alone. `1` signs every decision alone.
    #[arg(long, env = "AGENTMESH_SIGN_BATCH", default_value_t = DEFAULT_SIGN_BATCH)]
    pub sign_batch: usize,
    /// Longest time the signer keeps collecting decisions after the first
    /// of a batch, in microseconds (closed early by a full batch): what a
    /// decision may wait for others to share its signature. `0` signs
    /// whatever is waiting at once. Tokio's timer rounds it up to whole
    /// milliseconds.
    #[arg(long, env = "AGENTMESH_SIGN_WINDOW_US", default_value_t = DEFAULT_SIGN_WINDOW_US)]
    pub sign_window_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: broker_config::NatsArgs::default(),
            policies: PathBuf::from(DEFAULT_POLICIES),
            max_event_bytes: schemas::DEFAULT_MAX_EVENT_BYTES,
            consumer: DEFAULT_CONSUMER.into(),
            batch: DEFAULT_BATCH,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            nats_monitoring_url: Vec::new(),
            ack_wait_secs: DEFAULT_ACK_WAIT_SECS,
            watch_policies: true,
            stream_replicas: DEFAULT_STREAM_REPLICAS,
            stream_max_age_days: None,
            ready_file: None,
            shadow_policies: None,
            approval_timeout_secs: DEFAULT_APPROVAL_TIMEOUT_SECS,
            cache_flight_wait_ms: DEFAULT_CACHE_FLIGHT_WAIT_MS,
            redacted_original: broker_config::RedactedOriginal::Keep,
            grace: DEFAULT_GRACE,
            ops: telemetry::OpsConfig::default(),
            signing_key_file: None,
            signing_key: None,
            sign_batch: DEFAULT_SIGN_BATCH,
            sign_window_us: DEFAULT_SIGN_WINDOW_US,
        }
    }
}

impl Config {
    /// Validation limits (event size).
    pub fn limits(&self) -> schemas::Limits {
        schemas::Limits {
            max_event_bytes: self.max_event_bytes,
        }
    }

    /// How long JetStream waits for an ack before redelivering (at least 1 s).
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs.max(1))
    }

    /// How long a parked event waits for an approval before it is denied
    /// (at least 1 s).
    pub fn approval_timeout(&self) -> Duration {
        Duration::from_secs(self.approval_timeout_secs.max(1))
    }

    /// How long a cacheable call waits for an identical call's result.
    pub fn cache_flight_wait(&self) -> Duration {
        Duration::from_millis(self.cache_flight_wait_ms)
    }

    /// Stream settings applied at start.
    pub fn broker(&self) -> broker_config::Options {
        broker_config::Options {
            replicas: self.stream_replicas,
            ..Default::default()
        }
        .with_max_age_days(self.stream_max_age_days)
    }
}

/// Why the worker stopped or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The policy set was refused at start.
    #[error("policies in `{}` refused: {source}", dir.display())]
    Policies {
        /// The policy directory.
        dir: PathBuf,
        /// The first problem.
        source: LoadError,
    },
    /// The service skeleton could not start: the health server, the NATS
    /// connection or the ready file.
    #[error(transparent)]
    Start(#[from] telemetry::StartError),
    /// The signing key file could not be read.
    #[error("NATS credentials: {0}")]
    Credentials(#[from] broker_config::credentials::CredentialsError),
    /// Streams could not be applied.
    #[error(transparent)]
    Broker(#[from] broker_config::ApplyError),
    /// The durable consumer could not be created or read.
    #[error("consumer `{name}` on `MESH_INGRESS`: {source}")]
    Consumer {
        /// The consumer name.
        name: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
    /// The policy directory could not be watched.
    #[error("cannot watch `{}` for policy changes: {source}", dir.display())]
    Watch {
        /// The policy directory.
        dir: PathBuf,
        /// The watcher error.
        source: notify::Error,
    },
    /// A KV bucket of the guardrails could not be opened.
    #[error("KV bucket `{bucket}`: {source}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// The broker's answer.
        source: async_nats::Error,
    },
    /// The approval answer consumer could not be started.
    #[error("approval answers on `MESH_APPROVALS`: {source}")]
    Approvals {
        /// The broker's answer.
        source: async_nats::Error,
    },
}

/// Runs the worker until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    // First, so /healthz answers while the worker starts.
    let mut ops = telemetry::Service::start("policy-worker", &config.ops).await?;
    let consuming = ops.health().flag("consumer", false);
    let bundle = PolicyBundle::load(&config.policies).map_err(|source| Error::Policies {
        dir: config.policies.clone(),
        source,
    })?;
    tracing::info!(policy_hash = bundle.hash(), policies = bundle.len(), dir = %config.policies.display(), "Policies loaded.");
    let (policies_tx, policies_rx) = watch::channel(Arc::new(bundle));
    // A refused reload keeps the active set, so once loaded they stay loaded.
    ops.health().flag("policies", true);

    let client = ops.connect(&config.nats).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(config.max_in_flight * 2)
        .backpressure_on_inflight(true)
        .build(client.clone());
    broker_config::apply(&js, &config.broker()).await?;
    durability::report(
        &config.nats_monitoring_url,
        &telemetry::NatsDurability::new(ops.metrics()),
    )
    .await;

    let consumer = worker::ingress_consumer(&js, &config).await?;
    let lag = telemetry::ConsumerLag::new(ops.metrics()).watch(
        consumer.clone(),
        schemas::subjects::STREAM_INGRESS,
        LAG_POLL,
        shutdown.clone(),
    );
    let _reloader = reload::spawn(
        config.policies.clone(),
        config.watch_policies,
        policies_tx,
        shutdown.clone(),
    )?;
    let (shadow, _shadow_reloader) = match &config.shadow_policies {
        Some(dir) => {
            let bundle = PolicyBundle::load(dir).map_err(|source| Error::Policies {
                dir: dir.clone(),
                source,
            })?;
            tracing::info!(shadow_policy_hash = bundle.hash(), policies = bundle.len(), dir = %dir.display(), "Shadow policies loaded; they decide without effect.");
            let (tx, rx) = watch::channel(Arc::new(bundle));
            let reloader = reload::spawn(dir.clone(), config.watch_policies, tx, shutdown.clone())?;
            (Some(rx), Some(reloader))
        }
        None => (None, None),
    };
    let bucket = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_key_value(name).await.map_err(|e| Error::Bucket {
                bucket: name.to_owned(),
                source: e.into(),
            })
        }
    };
    let metrics = telemetry::WorkerMetrics::new(ops.metrics());
    let key = match (&config.signing_key, &config.signing_key_file) {
        (Some(key), _) => Some(key.clone()),
        (None, Some(path)) => Some(Arc::new(broker_config::credentials::read_signing_key_file(
            path,
        )?)),
        (None, None) => None,
    };
    let sealer = signing::Sealer::start(
        key,
        &js,
        config.sign_batch,
        Duration::from_micros(config.sign_window_us),
        metrics.clone(),
    )
    .await;
    let counters = limits::Counters::kv(bucket(schemas::subjects::BUCKET_LIMITS).await?);
    let approvals = Arc::new(approval::Approvals::new(
        js.clone(),
        bucket(schemas::subjects::BUCKET_APPROVALS).await?,
        config.approval_timeout(),
        metrics.clone(),
        sealer.clone(),
    ));
    approval::spawn(
        approvals.clone(),
        format!("{}-approvals", config.consumer),
        shutdown.clone(),
    )
    .await
    .map_err(|source| Error::Approvals { source })?;
    let flows = flows::Flows::new(bucket(schemas::subjects::BUCKET_FLOWS).await?);
    let guard = guard::Runtime::new(counters, flows, shadow, approvals);
    // Waiting calls may hold at most half the in-flight window, so the
    // results they wait for can always be decided.
    let cache = Arc::new(cache::ToolCache::new(
        bucket(schemas::subjects::BUCKET_TOOL_CACHE).await?,
        config.cache_flight_wait(),
        config.max_in_flight / 2,
        telemetry::CacheMetrics::new(ops.metrics()),
    ));
    cache.watch_size(shutdown.clone());
    let cards = cards::Cards::open(&js, shutdown.clone())
        .await
        .map_err(|source| Error::Bucket {
            bucket: schemas::subjects::BUCKET_AGENTS.to_owned(),
            source,
        })?;

    ops.ready(config.ready_file.as_deref())?;
    consuming.set(true);
    tracing::info!(consumer = %config.consumer, signer = sealer.public_key(), "Policy worker ready.");

    // A broker config older than this worker has no `MESH_CALL`: tool calls
    // then travel as deliveries only, as before.
    let calls = js.get_stream(schemas::subjects::STREAM_CALL).await.is_ok();
    if !calls {
        tracing::warn!(
            stream = schemas::subjects::STREAM_CALL,
            "Stream missing; tool calls are routed as deliveries only."
        );
    }
    let js_watch = js.clone();
    let worker = worker::Worker::new(
        js,
        policies_rx,
        guard,
        cache,
        cards,
        &config,
        metrics,
        calls,
        sealer,
    );
    // A stream that loses messages the worker stored (a node back with a
    // damaged store) is reported, not passed over in silence.
    let _watermarks = watermarks::spawn(
        worker.watermarks.clone(),
        js_watch,
        telemetry::StreamLosses::new(ops.metrics()),
        shutdown.clone(),
    );
    // The consume loop runs on the runtime's worker threads like the
    // events it spawns: in `main`'s `block_on` it was a third busy thread
    // on the cores the runtime already uses, and each event spawned from
    // there went through the shared queue and woke a worker thread. The
    // handle aborts it when `run` is dropped, as when it ran inline.
    let consume =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(worker.consume(consumer, shutdown)));
    if let Err(error) = consume.await {
        tracing::error!(%error, "The consume loop ended abnormally.");
    }
    consuming.set(false);
    lag.abort();

    // Make sure every ack we sent reached the server before we go.
    let _ = client.flush().await;
    ops.shutdown().await;
    tracing::info!("Policy worker stopped.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_keep_their_names_and_defaults_match_default() {
        let config = Config::try_parse_from([
            "policy-worker",
            "--nats-url",
            "nats://n:4222",
            "--policies",
            "/p",
            "--no-watch",
            "--ack-wait-secs",
            "0",
            "--approval-timeout-secs",
            "7",
            "--cache-flight-wait-ms",
            "250",
            "--stream-replicas",
            "3",
            "--max-event-bytes",
            "2048",
        ])
        .unwrap();
        assert_eq!(config.nats.url, "nats://n:4222");
        assert_eq!(config.policies, PathBuf::from("/p"));
        assert!(!config.watch_policies);
        assert_eq!(config.ack_wait(), Duration::from_secs(1), "at least 1 s");
        assert_eq!(config.approval_timeout(), Duration::from_secs(7));
        assert_eq!(config.cache_flight_wait(), Duration::from_millis(250));
        assert_eq!(config.broker().replicas, 3);
        assert_eq!(config.limits().max_event_bytes, 2048);
        assert_eq!(config.grace, DEFAULT_GRACE);

        let plain = Config::try_parse_from(["policy-worker"]).unwrap();
        let default = Config::default();
        assert!(plain.watch_policies && default.watch_policies);
        for (var, parsed, expected) in [
            ("AGENTMESH_WORKER_BATCH", plain.batch, default.batch),
            (
                "AGENTMESH_WORKER_IN_FLIGHT",
                plain.max_in_flight,
                default.max_in_flight,
            ),
            (
                "AGENTMESH_STREAM_REPLICAS",
                plain.stream_replicas,
                default.stream_replicas,
            ),
        ] {
            if std::env::var_os(var).is_none() {
                assert_eq!(parsed, expected, "{var}");
            }
        }
        if std::env::var_os("AGENTMESH_ACK_WAIT_SECS").is_none() {
            assert_eq!(plain.ack_wait_secs, default.ack_wait_secs);
        }
        if std::env::var_os("AGENTMESH_WORKER_CONSUMER").is_none() {
            assert_eq!(plain.consumer, default.consumer);
        }
    }
}

//! The policy worker: a durable pull consumer on `MESH_INGRESS` that decides
//! every event with Cedar, publishes exactly one receipt per event, routes
//! approved events to their target byte for byte and dead-letters the rest.
//!
//! `main.rs` parses flags into a [`Config`] and calls [`run`]; tests start
//! the same `run` in-process.
//!
//! Guardrails around each decision (`docs/guardrails.md`): payload
//! detectors ([`Detector`]), rate and budget counters in JetStream KV, a
//! shadow policy set evaluated without effect, human approval for permits
//! annotated `@approval("required")`, and [`Replayer`] for deciding recorded
//! events with a candidate set.
//!
//! The tool-result cache (`docs/cache.md`, module `cache`) answers approved
//! calls of tools declared in `cache.toml` from JetStream KV.

mod approval;
mod cache;
mod detect;
mod guard;
mod limits;
mod policy;
mod reload;
mod replay;
mod signing;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use approval::{Answer, AnswerAction, ApprovalState, approval_id, send_answer};
pub use cache::{
    CACHE_FILE, CacheRules, Entry as CacheEntry, Scope as CacheScope, ToolRule,
    answer_id as cached_answer_id, purge as purge_cache, purge_filter, size as cache_size,
    tool_token,
};
pub use detect::{Detector, Findings, KINDS as DETECTOR_KINDS};
pub use guard::{APPROVAL_ANNOTATION, GuardMeta, Guards};
pub use limits::{AgentTally, Tallies, Usage, WorkflowTally, agent_key, workflow_key};
pub use policy::{
    ENTITIES_FILE, LoadError, PolicyBundle, SCHEMA_FILE, UNREGISTERED_AGENT, Verdict,
    generated_policies,
};
pub use replay::{Outcome, Replayed, Replayer};

/// How often the consumer's lag is read for `agentmesh.consumer.pending`.
const LAG_POLL: Duration = Duration::from_secs(5);

/// Everything the worker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server URL.
    pub nats_url: String,
    /// How to authenticate to NATS (none by default).
    pub credentials: broker_config::NatsCredentials,
    /// Directory with `schema.cedarschema`, `entities.json` and `*.cedar`.
    pub policies: PathBuf,
    /// Validation limits (event size).
    pub limits: schemas::Limits,
    /// Durable consumer name on `MESH_INGRESS`; replicas share it.
    pub consumer: String,
    /// Messages requested per pull.
    pub batch: usize,
    /// Events being decided and published at once.
    pub max_in_flight: usize,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Watch the policy directory and reload on change.
    pub watch_policies: bool,
    /// Created once the worker is consuming; removed on exit.
    pub ready_file: Option<PathBuf>,
    /// Stream settings applied at start.
    pub broker: broker_config::Options,
    /// How long in-flight events may take to finish at shutdown.
    pub grace: Duration,
    /// A second policy directory evaluated on every event without effect;
    /// receipts record its decision.
    pub shadow_policies: Option<PathBuf>,
    /// How long a parked event waits for an approval before it is denied.
    pub approval_timeout: Duration,
    /// How long a call of a cacheable tool waits for an identical call's
    /// result already in flight before it goes to the tool itself.
    pub cache_flight_wait: Duration,
    /// Health and metrics server, OTLP export (off by default).
    pub ops: telemetry::OpsConfig,
    /// This replica's decision signing key (`--signing-key-file`). `None`:
    /// a key for this run only, which the worker adds to `mesh-signers`
    /// where the broker lets it (development stacks without authorization).
    pub signing_key: Option<Arc<schemas::signing::SigningKey>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            credentials: broker_config::NatsCredentials::default(),
            policies: PathBuf::from("policies"),
            limits: schemas::Limits::default(),
            consumer: "policy-worker".into(),
            batch: 256,
            max_in_flight: 512,
            ack_wait: Duration::from_secs(30),
            watch_policies: true,
            ready_file: None,
            broker: broker_config::Options::default(),
            grace: Duration::from_secs(10),
            shadow_policies: None,
            approval_timeout: Duration::from_secs(3600),
            cache_flight_wait: Duration::from_secs(10),
            ops: telemetry::OpsConfig::default(),
            signing_key: None,
        }
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
    /// NATS could not be reached.
    #[error(
        "cannot connect to NATS at `{url}`: {source} (is nats-server running? `meshctl up` starts one; set NATS_URL or --nats-url to point elsewhere)"
    )]
    Connect {
        /// The URL tried.
        url: String,
        /// The client error.
        source: async_nats::ConnectError,
    },
    /// The NATS credentials could not be read.
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
    /// The health and metrics server or the OTLP exporter could not start.
    #[error(transparent)]
    Telemetry(#[from] telemetry::Error),
    /// The ready file could not be written.
    #[error("cannot write the ready file `{}`: {source}", path.display())]
    ReadyFile {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Runs the worker until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    // First, so /healthz answers while the worker starts.
    let ops = telemetry::Ops::start("policy-worker", &config.ops).await?;
    let consuming = ops.health().flag("consumer", false);
    let bundle = PolicyBundle::load(&config.policies).map_err(|source| Error::Policies {
        dir: config.policies.clone(),
        source,
    })?;
    tracing::info!(policy_hash = bundle.hash(), policies = bundle.len(), dir = %config.policies.display(), "Policies loaded.");
    let (policies_tx, policies_rx) = watch::channel(Arc::new(bundle));
    // A refused reload keeps the active set, so once loaded they stay loaded.
    ops.health().flag("policies", true);

    let options = config
        .credentials
        .apply(async_nats::ConnectOptions::new().name("policy-worker"))
        .await?;
    let client = options
        .connect(&config.nats_url)
        .await
        .map_err(|source| Error::Connect {
            url: config.nats_url.clone(),
            source,
        })?;
    let nats = client.clone();
    ops.health().probe("nats", move || {
        nats.connection_state() == async_nats::connection::State::Connected
    });
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(config.max_in_flight * 2)
        .backpressure_on_inflight(true)
        .build(client.clone());
    broker_config::apply(&js, &config.broker).await?;

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
    let sealer = signing::Sealer::start(config.signing_key.clone(), &js).await;
    let counters = limits::Counters::kv(bucket(schemas::subjects::BUCKET_LIMITS).await?);
    let approvals = Arc::new(approval::Approvals::new(
        js.clone(),
        bucket(schemas::subjects::BUCKET_APPROVALS).await?,
        config.approval_timeout,
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
    let guard = guard::Runtime::new(counters, shadow, approvals);
    // Waiting calls may hold at most half the in-flight window, so the
    // results they wait for can always be decided.
    let cache = Arc::new(cache::ToolCache::new(
        bucket(schemas::subjects::BUCKET_TOOL_CACHE).await?,
        config.cache_flight_wait,
        config.max_in_flight / 2,
        telemetry::CacheMetrics::new(ops.metrics()),
    ));
    cache.watch_size(shutdown.clone());

    if let Some(path) = &config.ready_file {
        std::fs::write(path, b"ready\n").map_err(|source| Error::ReadyFile {
            path: path.clone(),
            source,
        })?;
    }
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
    let worker = worker::Worker::new(
        js,
        policies_rx,
        guard,
        cache,
        &config,
        metrics,
        calls,
        sealer,
    );
    worker.consume(consumer, shutdown).await;
    consuming.set(false);
    lag.abort();

    if let Some(path) = &config.ready_file {
        let _ = std::fs::remove_file(path);
    }
    // Make sure every ack we sent reached the server before we go.
    let _ = client.flush().await;
    ops.shutdown().await;
    tracing::info!("Policy worker stopped.");
    Ok(())
}

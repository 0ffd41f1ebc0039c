//! The audit sink: every ingress event, every decision receipt and every GPU
//! lease event, written to ClickHouse (database `agentmesh`, tables
//! `events`, `decisions`, `gpu_leases` of `docs/contract.md`).
//!
//! Each table has its own durable pull consumer (`audit-sink-events` on
//! `MESH_INGRESS`, `audit-sink-decisions` on `MESH_DECISION`,
//! `audit-sink-gpu` on `MESH_GPU`), so the sink sees every message whatever
//! else is down. Rows are inserted in batches, one `clickhouse::insert::Insert`
//! per batch (flushed by rows, bytes or period), and a message is acked only
//! once the insert holding it succeeded: at-least-once, with duplicates
//! collapsing in the `ReplacingMergeTree` tables.

use std::path::PathBuf;
use std::time::Duration;

use clickhouse::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod chain;
mod originals;
mod pipeline;
/// The tables' declarations live in `audit-tables`, shared with the readers.
pub use audit_tables::{queries, rows, schema};

pub use audit_tables::{DEFAULT_CLICKHOUSE_URL, DEFAULT_CLICKHOUSE_USER};
/// Default rows per batch.
pub const DEFAULT_BATCH_ROWS: u64 = 10_000;
/// Default bytes per batch (uncompressed).
pub const DEFAULT_BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Default longest time a batch stays open, in milliseconds.
pub const DEFAULT_BATCH_PERIOD_MS: u64 = 1000;
/// Default quiet time after which the open batch is flushed, in
/// milliseconds: each such flush needs that long without a message, so it
/// adds at most five inserts per table per second.
pub const DEFAULT_BATCH_IDLE_MS: u64 = 200;
/// Default time one insert may take, in milliseconds.
pub const DEFAULT_INSERT_TIMEOUT_MS: u64 = 30_000;
/// Default JetStream ack wait of the sink's consumers, in milliseconds.
pub const DEFAULT_ACK_WAIT_MS: u64 = 30_000;
/// Default longest wait between insert retries, in milliseconds.
pub const DEFAULT_RETRY_MAX_MS: u64 = 5_000;
/// Default retention in days (0: rows are kept).
pub const DEFAULT_RETENTION_DAYS: u32 = 0;
/// Default time the open batch may take to insert at shutdown, in milliseconds.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Default replicas of the `MESH_*` streams.
pub const DEFAULT_STREAM_REPLICAS: usize = 1;

/// The sink's settings (flags, or the environment variables named).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "audit-sink",
    version,
    about = "Writes every mesh event and decision to ClickHouse"
)]
pub struct Config {
    /// NATS URL and credentials.
    #[command(flatten)]
    pub nats: broker_config::NatsArgs,
    /// ClickHouse HTTP URL; several replicas of one shard comma-separated
    /// (`http://ch-1:8123,http://ch-2:8123`): the sink writes to one and
    /// fails over to the next when an insert fails, retrying the same batch.
    #[arg(long, env = "CLICKHOUSE_URL", default_value = DEFAULT_CLICKHOUSE_URL)]
    pub clickhouse_url: String,
    /// Create missing audit tables as `ReplicatedReplacingMergeTree`
    /// (ZooKeeper path `/clickhouse/tables/{shard}/<database>/<table>`,
    /// replica `{replica}`: the servers' macros), on every server of
    /// `--clickhouse-url`.
    #[arg(long, env = "AGENTMESH_AUDIT_CLICKHOUSE_REPLICATED")]
    pub clickhouse_replicated: bool,
    /// ClickHouse user.
    #[arg(long, env = "CLICKHOUSE_USER", default_value = DEFAULT_CLICKHOUSE_USER)]
    pub clickhouse_user: String,
    /// ClickHouse password.
    #[arg(
        long,
        env = "CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub clickhouse_password: String,
    /// Database of the audit tables (created if missing).
    #[arg(long, env = "AGENTMESH_AUDIT_DATABASE", default_value = schema::DEFAULT_DATABASE)]
    pub database: String,
    /// Flush a batch once it holds this many rows.
    #[arg(long, env = "AGENTMESH_AUDIT_BATCH_ROWS", default_value_t = DEFAULT_BATCH_ROWS)]
    pub batch_rows: u64,
    /// Flush a batch once it holds this many bytes (uncompressed).
    #[arg(long, env = "AGENTMESH_AUDIT_BATCH_BYTES", default_value_t = DEFAULT_BATCH_BYTES)]
    pub batch_bytes: u64,
    /// Flush a batch at least this often, in milliseconds.
    #[arg(long, env = "AGENTMESH_AUDIT_BATCH_PERIOD_MS", default_value_t = DEFAULT_BATCH_PERIOD_MS)]
    pub batch_period_ms: u64,
    /// Flush a batch once no message came for it for this long, in
    /// milliseconds (0: only by rows, bytes and period): rows are queryable
    /// soon after traffic pauses, and a busy stream is still cut by the
    /// other limits alone.
    #[arg(long, env = "AGENTMESH_AUDIT_BATCH_IDLE_MS", default_value_t = DEFAULT_BATCH_IDLE_MS)]
    pub batch_idle_ms: u64,
    /// Give up on one insert after this long, in milliseconds (then retry).
    #[arg(
        long,
        env = "AGENTMESH_AUDIT_INSERT_TIMEOUT_MS",
        default_value_t = DEFAULT_INSERT_TIMEOUT_MS
    )]
    pub insert_timeout_ms: u64,
    /// JetStream ack wait of the sink's consumers, in milliseconds.
    #[arg(long, env = "AGENTMESH_AUDIT_ACK_WAIT_MS", default_value_t = DEFAULT_ACK_WAIT_MS)]
    pub ack_wait_ms: u64,
    /// Longest wait between insert retries while ClickHouse fails, in milliseconds.
    #[arg(long, env = "AGENTMESH_AUDIT_RETRY_MAX_MS", default_value_t = DEFAULT_RETRY_MAX_MS)]
    pub retry_max_ms: u64,
    /// Drop rows older than this many days (TTL; 0 keeps them; needs ClickHouse 20.1+).
    #[arg(long, env = "AGENTMESH_AUDIT_RETENTION_DAYS", default_value_t = DEFAULT_RETENTION_DAYS)]
    pub retention_days: u32,
    /// Give up and exit when no ClickHouse of `--clickhouse-url` has taken
    /// the schema within this many seconds of the start (0: wait for ever).
    #[arg(
        long,
        env = "AGENTMESH_AUDIT_CLICKHOUSE_WAIT_SECS",
        default_value_t = 0
    )]
    pub clickhouse_wait_secs: u64,
    /// On shutdown, keep trying to insert the open batch this long, in milliseconds.
    #[arg(
        long,
        env = "AGENTMESH_AUDIT_SHUTDOWN_GRACE_MS",
        default_value_t = DEFAULT_SHUTDOWN_GRACE_MS
    )]
    pub shutdown_grace_ms: u64,
    /// Replicas of the MESH_* streams when they are created or updated (3 on
    /// a 3-node cluster; every service must say the same).
    #[arg(long, env = "AGENTMESH_STREAM_REPLICAS", default_value_t = DEFAULT_STREAM_REPLICAS)]
    pub stream_replicas: usize,
    /// Days events are kept in the `MESH_*` streams (their `max_age`; `MESH_AUDIT` is kept for good). Unset: a stream this service creates gets 7 days and an existing one keeps what it has; every service should say the same.
    #[arg(long, env = "AGENTMESH_STREAM_MAX_AGE_DAYS")]
    pub stream_max_age_days: Option<u64>,
    /// Create this file once ready (schema and consumers in place); removed on exit.
    #[arg(long, env = "AGENTMESH_AUDIT_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// This replica's signing key for audit checkpoints on `MESH_AUDIT`: a
    /// file holding an nkey seed (mode 0600; `meshctl up` writes
    /// `.agentmesh/auth/signing/audit-sink.nk`). Without it no checkpoints
    /// are written, and `meshctl audit verify` cannot find deleted rows.
    #[arg(long, env = "AGENTMESH_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// What becomes of the original of a redacted delivery, as the policy
    /// worker was told: `keep` (the `events` row keeps it) or `drop` (no
    /// event row is written before the worker decided the event, and the
    /// row of an original the worker erased has no data).
    #[arg(long, env = "AGENTMESH_REDACTED_ORIGINAL", value_enum, default_value_t = broker_config::RedactedOriginal::Keep)]
    pub redacted_original: broker_config::RedactedOriginal,
    /// The policy worker's durable consumer on `MESH_INGRESS`, which
    /// `--redacted-original drop` waits for.
    #[arg(long, env = "AGENTMESH_WORKER_CONSUMER", default_value = broker_config::auth::POLICY_WORKER_CONSUMER)]
    pub worker_consumer: String,
    /// Health and metrics server, log format, OTLP export.
    #[command(flatten)]
    pub ops: telemetry::OpsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self::new(broker_config::DEFAULT_NATS_URL, DEFAULT_CLICKHOUSE_URL)
    }
}

impl Config {
    /// The defaults, pointed at these servers.
    pub fn new(nats_url: impl Into<String>, clickhouse_url: impl Into<String>) -> Self {
        Self {
            nats: broker_config::NatsArgs::url(nats_url),
            clickhouse_url: clickhouse_url.into(),
            clickhouse_replicated: false,
            clickhouse_user: DEFAULT_CLICKHOUSE_USER.into(),
            clickhouse_password: String::new(),
            database: schema::DEFAULT_DATABASE.into(),
            batch_rows: DEFAULT_BATCH_ROWS,
            batch_bytes: DEFAULT_BATCH_BYTES,
            batch_period_ms: DEFAULT_BATCH_PERIOD_MS,
            batch_idle_ms: DEFAULT_BATCH_IDLE_MS,
            insert_timeout_ms: DEFAULT_INSERT_TIMEOUT_MS,
            ack_wait_ms: DEFAULT_ACK_WAIT_MS,
            retry_max_ms: DEFAULT_RETRY_MAX_MS,
            retention_days: DEFAULT_RETENTION_DAYS,
            clickhouse_wait_secs: 0,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            stream_replicas: DEFAULT_STREAM_REPLICAS,
            stream_max_age_days: None,
            ready_file: None,
            signing_key_file: None,
            redacted_original: broker_config::RedactedOriginal::Keep,
            worker_consumer: broker_config::auth::POLICY_WORKER_CONSUMER.to_owned(),
            ops: telemetry::OpsConfig::default(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        schema::check_database(&self.database)
            .map_err(|e| Error::Config(format!("--database: {e}")))?;
        let positive = [
            ("--batch-rows", self.batch_rows),
            ("--batch-bytes", self.batch_bytes),
            ("--batch-period-ms", self.batch_period_ms),
            ("--insert-timeout-ms", self.insert_timeout_ms),
            ("--ack-wait-ms", self.ack_wait_ms),
            ("--retry-max-ms", self.retry_max_ms),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{flag} must be greater than 0")));
            }
        }
        let urls = self.clickhouse_urls();
        if urls.is_empty() {
            return Err(Error::Config(format!(
                "--clickhouse-url is empty: give the HTTP interface, e.g. `{DEFAULT_CLICKHOUSE_URL}`"
            )));
        }
        for url in urls {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(Error::Config(format!(
                    "--clickhouse-url `{url}` must be the HTTP interface, e.g. `{DEFAULT_CLICKHOUSE_URL}`"
                )));
            }
        }
        Ok(())
    }

    /// The ClickHouse URLs of `--clickhouse-url`, in order.
    pub fn clickhouse_urls(&self) -> Vec<&str> {
        self.clickhouse_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The engine of the audit tables the sink creates.
    pub fn engine(&self) -> schema::Engine {
        if self.clickhouse_replicated {
            schema::Engine::Replicated { on_cluster: None }
        } else {
            schema::Engine::Single
        }
    }

    /// A ClickHouse client for this config (the first server of
    /// `--clickhouse-url`), without a default database.
    pub fn clickhouse_client(&self) -> Client {
        self.clickhouse_client_for(
            self.clickhouse_urls()
                .first()
                .copied()
                .unwrap_or(DEFAULT_CLICKHOUSE_URL),
        )
    }

    /// A ClickHouse client for the server at `url` with this config's
    /// user, without a default database.
    fn clickhouse_client_for(&self, url: &str) -> Client {
        Client::default()
            .with_url(url)
            .with_user(&self.clickhouse_user)
            .with_password(&self.clickhouse_password)
            // 18.16 has no RowBinaryWithNamesAndTypes.
            .with_validation(false)
    }

    /// One endpoint per server of `--clickhouse-url`.
    fn endpoints(&self) -> Vec<pipeline::Endpoint> {
        self.clickhouse_urls()
            .into_iter()
            .map(|url| {
                let ddl = self.clickhouse_client_for(url);
                pipeline::Endpoint {
                    url: url.to_owned(),
                    client: ddl.clone().with_database(&self.database),
                    ddl,
                }
            })
            .collect()
    }
}

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The service skeleton could not start: the health server, the NATS
    /// connection or the ready file.
    #[error(transparent)]
    Start(#[from] telemetry::StartError),
    /// The NATS credentials could not be read.
    #[error("NATS credentials: {0}")]
    Credentials(#[from] broker_config::credentials::CredentialsError),
    /// The streams could not be applied.
    #[error(transparent)]
    Broker(#[from] broker_config::ApplyError),
    /// A durable consumer could not be created.
    #[error("consumer `{durable}`: {source}")]
    Consumer {
        /// The durable name.
        durable: &'static str,
        /// The broker's answer.
        source: async_nats::Error,
    },
    /// No ClickHouse took the schema within `--clickhouse-wait-secs`.
    #[error(
        "no ClickHouse at {urls} answered within {secs} s (AGENTMESH_AUDIT_CLICKHOUSE_WAIT_SECS): {last}"
    )]
    ClickHouseNeverCame {
        /// The URLs tried, comma-separated.
        urls: String,
        /// The wait.
        secs: u64,
        /// The last error.
        last: String,
    },
}

/// Runs the sink until `shutdown` is cancelled: applies the streams, waits
/// for ClickHouse and creates the schema, creates the consumers, writes the
/// ready file, then moves messages into tables; on shutdown inserts what it
/// holds (within the grace period) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    config.validate()?;
    let signing_key = match &config.signing_key_file {
        Some(path) => Some(std::sync::Arc::new(
            broker_config::credentials::read_signing_key_file(path)?,
        )),
        None => None,
    };
    // First, so /healthz answers while the sink waits for its servers.
    let mut ops = telemetry::Service::start("audit-sink", &config.ops).await?;
    let consuming = ops.health().flag("consumers", false);
    let clickhouse_up = ops.health().flag("clickhouse", false);
    let nats = ops.connect(&config.nats).await?;
    let js = async_nats::jetstream::new(nats);
    let broker = broker_config::Options {
        replicas: config.stream_replicas.max(1),
        ..broker_config::Options::default()
    }
    .with_max_age_days(config.stream_max_age_days);
    broker_config::apply(&js, &broker).await?;

    let endpoints = config.endpoints();
    let Some(features) = wait_for_schema(&endpoints, &config, &shutdown).await? else {
        return Ok(());
    };
    clickhouse_up.set(true);
    let pinger = tokio::spawn(ping_clickhouse(
        endpoints.iter().map(|e| e.ddl.clone()).collect(),
        clickhouse_up,
        shutdown.clone(),
    ));
    if config.retention_days > 0 && !features.ttl {
        tracing::warn!(version = %features.version, "Retention needs ClickHouse 20.1+ (TTL); rows are kept.");
    }

    let settings = pipeline::Settings {
        database: config.database.clone(),
        engine: config.engine(),
        retention_days: config.retention_days,
        batch_rows: config.batch_rows,
        batch_bytes: config.batch_bytes,
        batch_period: Duration::from_millis(config.batch_period_ms),
        batch_idle: Duration::from_millis(config.batch_idle_ms),
        insert_timeout: Duration::from_millis(config.insert_timeout_ms),
        ack_wait: Duration::from_millis(config.ack_wait_ms),
        retry_max: Duration::from_millis(config.retry_max_ms),
        shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
        metrics: telemetry::SinkMetrics::new(ops.metrics()),
    };
    let events = pipeline::consumer::<pipeline::Events>(&js, &settings).await?;
    let decisions = pipeline::consumer::<pipeline::Decisions>(&js, &settings).await?;
    let gpu = pipeline::consumer::<pipeline::GpuLeases>(&js, &settings).await?;
    let lag = telemetry::ConsumerLag::new(ops.metrics());
    let watchers = [
        lag.watch(
            events.clone(),
            schemas::subjects::STREAM_INGRESS,
            LAG_POLL,
            shutdown.clone(),
        ),
        lag.watch(
            decisions.clone(),
            schemas::subjects::STREAM_DECISION,
            LAG_POLL,
            shutdown.clone(),
        ),
        lag.watch(
            gpu.clone(),
            schemas::subjects::STREAM_GPU,
            LAG_POLL,
            shutdown.clone(),
        ),
    ];

    let tracker = TaskTracker::new();
    if let Some(key) = &signing_key {
        let chain = chain::consumer(&js)
            .await
            .map_err(|source| Error::Consumer {
                durable: schemas::subjects::DURABLE_AUDIT_CHAIN,
                source,
            })?;
        tracker.spawn(chain::run(
            js.clone(),
            chain,
            key.clone(),
            Duration::from_millis(config.batch_period_ms),
            shutdown.clone(),
        ));
    } else {
        tracing::warn!("No signing key (--signing-key-file): no audit checkpoints are written.");
    }
    let gate = (config.redacted_original == broker_config::RedactedOriginal::Drop).then(|| {
        originals::Gate::new(
            &js,
            &config.worker_consumer,
            Duration::from_millis(config.ack_wait_ms),
        )
    });
    tracker.spawn(pipeline::run::<pipeline::Events>(
        events,
        endpoints.clone(),
        settings.clone(),
        gate,
        shutdown.clone(),
    ));
    tracker.spawn(pipeline::run::<pipeline::Decisions>(
        decisions,
        endpoints.clone(),
        settings.clone(),
        None,
        shutdown.clone(),
    ));
    tracker.spawn(pipeline::run::<pipeline::GpuLeases>(
        gpu,
        endpoints,
        settings,
        None,
        shutdown.clone(),
    ));
    tracker.close();

    ops.ready(config.ready_file.as_deref())?;
    tracing::info!(
        nats = %config.nats.url,
        clickhouse = %config.clickhouse_url,
        database = %config.database,
        version = %features.version,
        "Audit sink ready."
    );
    consuming.set(true);
    tracker.wait().await;
    consuming.set(false);
    pinger.abort();
    for watcher in watchers {
        watcher.abort();
    }
    ops.shutdown().await;
    tracing::info!("Audit sink stopped.");
    Ok(())
}

/// How often the consumers' lag is read for `agentmesh.consumer.pending`.
const LAG_POLL: Duration = Duration::from_secs(5);

/// Keeps the `clickhouse` readiness check current: `SELECT 1` every few
/// seconds, failing after a short timeout; ready while one of the servers
/// answers.
async fn ping_clickhouse(
    clients: Vec<Client>,
    up: telemetry::ReadyFlag,
    shutdown: CancellationToken,
) {
    const EVERY: Duration = Duration::from_secs(5);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let mut ok = false;
        for client in &clients {
            let ping =
                tokio::time::timeout(Duration::from_secs(3), client.query("SELECT 1").execute());
            if matches!(ping.await, Ok(Ok(()))) {
                ok = true;
                break;
            }
        }
        if ok != up.get() {
            tracing::info!(clickhouse_reachable = ok, "ClickHouse readiness changed.");
        }
        up.set(ok);
    }
}

/// Creates the schema, retrying with backoff while no ClickHouse server is
/// there; `None` when shut down first. With several servers (replicas),
/// the schema is created on each that answers (once one did, the others
/// are tried once: one that is down gets it when an insert fails over to
/// it).
async fn wait_for_schema(
    endpoints: &[pipeline::Endpoint],
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<schema::ServerFeatures>, Error> {
    let mut backoff = Duration::from_millis(100);
    let max = Duration::from_millis(config.retry_max_ms);
    let engine = config.engine();
    let limit = (config.clickhouse_wait_secs > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs(config.clickhouse_wait_secs));
    let mut last = String::new();
    loop {
        let mut features = None;
        for endpoint in endpoints {
            match schema::ensure_with(
                &endpoint.ddl,
                &config.database,
                config.retention_days,
                &engine,
            )
            .await
            {
                Ok(found) => {
                    features.get_or_insert(found);
                }
                Err(e) => {
                    tracing::warn!(
                        clickhouse = %endpoint.url,
                        error = %e,
                        retry_in = ?backoff,
                        "Waiting for ClickHouse to create the audit schema."
                    );
                    last = format!("{}: {e}", endpoint.url);
                }
            }
        }
        if features.is_some() {
            return Ok(features);
        }
        if limit.is_some_and(|limit| tokio::time::Instant::now() + backoff > limit) {
            return Err(Error::ClickHouseNeverCame {
                urls: config.clickhouse_urls().join(","),
                secs: config.clickhouse_wait_secs,
                last,
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn several_clickhouse_urls_are_replicas_to_fail_over_between() {
        let config = Config::try_parse_from([
            "audit-sink",
            "--clickhouse-url",
            "http://ch-1:8123, http://ch-2:8123",
            "--clickhouse-replicated",
        ])
        .unwrap();
        assert_eq!(
            config.clickhouse_urls(),
            ["http://ch-1:8123", "http://ch-2:8123"]
        );
        assert!(config.validate().is_ok());
        assert_eq!(
            config.engine(),
            schema::Engine::Replicated { on_cluster: None }
        );
        let endpoints = config.endpoints();
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1].url, "http://ch-2:8123");
        let mut bad = Config::new("nats://n:4222", "http://ch-1:8123,ch-2:9000");
        assert!(bad.validate().is_err());
        bad.clickhouse_url = " , ".into();
        assert!(bad.validate().is_err());
        assert_eq!(Config::default().engine(), schema::Engine::Single);
    }

    #[test]
    fn flags_keep_their_names_and_defaults_match_default() {
        let config = Config::try_parse_from([
            "audit-sink",
            "--nats-url",
            "nats://n:4222",
            "--nats-creds",
            "/u.creds",
            "--clickhouse-url",
            "http://c:8123",
            "--batch-rows",
            "5",
            "--stream-replicas",
            "3",
        ])
        .unwrap();
        assert_eq!(config.nats.url, "nats://n:4222");
        assert_eq!(
            config.nats.credentials.creds_file,
            Some(PathBuf::from("/u.creds"))
        );
        assert_eq!(config.clickhouse_url, "http://c:8123");
        assert_eq!(config.batch_rows, 5);
        assert_eq!(config.stream_replicas, 3);

        let plain = Config::try_parse_from(["audit-sink"]).unwrap();
        let default = Config::default();
        for (var, parsed, expected) in [
            (
                "AGENTMESH_AUDIT_BATCH_ROWS",
                plain.batch_rows,
                default.batch_rows,
            ),
            (
                "AGENTMESH_AUDIT_BATCH_BYTES",
                plain.batch_bytes,
                default.batch_bytes,
            ),
            (
                "AGENTMESH_AUDIT_BATCH_PERIOD_MS",
                plain.batch_period_ms,
                default.batch_period_ms,
            ),
            (
                "AGENTMESH_AUDIT_BATCH_IDLE_MS",
                plain.batch_idle_ms,
                default.batch_idle_ms,
            ),
            (
                "AGENTMESH_AUDIT_INSERT_TIMEOUT_MS",
                plain.insert_timeout_ms,
                default.insert_timeout_ms,
            ),
            (
                "AGENTMESH_AUDIT_ACK_WAIT_MS",
                plain.ack_wait_ms,
                default.ack_wait_ms,
            ),
            (
                "AGENTMESH_AUDIT_RETRY_MAX_MS",
                plain.retry_max_ms,
                default.retry_max_ms,
            ),
            (
                "AGENTMESH_AUDIT_SHUTDOWN_GRACE_MS",
                plain.shutdown_grace_ms,
                default.shutdown_grace_ms,
            ),
        ] {
            if std::env::var_os(var).is_none() {
                assert_eq!(parsed, expected, "{var}");
            }
        }
        if std::env::var_os("CLICKHOUSE_URL").is_none() {
            assert_eq!(plain.clickhouse_url, default.clickhouse_url);
        }
        if std::env::var_os("AGENTMESH_AUDIT_CLICKHOUSE_REPLICATED").is_none() {
            assert!(!plain.clickhouse_replicated);
        }
        if std::env::var_os("NATS_URL").is_none() {
            assert_eq!(plain.nats, default.nats);
        }
    }
}

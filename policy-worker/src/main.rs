//! `policy-worker`: parse flags, start logging, run until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Decides every agentmesh ingress event with Cedar policies.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS URL and credentials.
    #[command(flatten)]
    nats: telemetry::NatsArgs,
    /// Policy directory: `schema.cedarschema`, `entities.json`, `*.cedar`.
    #[arg(long, env = "AGENTMESH_POLICIES", default_value = "policies")]
    policies: PathBuf,
    /// Largest accepted event (headers + payload) in bytes.
    #[arg(long, env = "AGENTMESH_MAX_EVENT_BYTES", default_value_t = schemas::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Durable consumer name on MESH_INGRESS (replicas share one name).
    #[arg(
        long,
        env = "AGENTMESH_WORKER_CONSUMER",
        default_value = "policy-worker"
    )]
    consumer: String,
    /// Messages requested per pull.
    #[arg(long, env = "AGENTMESH_WORKER_BATCH", default_value_t = 256)]
    batch: usize,
    /// Events decided and published concurrently.
    #[arg(long, env = "AGENTMESH_WORKER_IN_FLIGHT", default_value_t = 512)]
    max_in_flight: usize,
    /// Seconds JetStream waits for an ack before redelivering an event.
    #[arg(long, env = "AGENTMESH_ACK_WAIT_SECS", default_value_t = 30)]
    ack_wait_secs: u64,
    /// Do not watch the policy directory (reload on SIGHUP only).
    #[arg(long)]
    no_watch: bool,
    /// Replicas of the MESH_* streams when they are created or updated.
    #[arg(long, env = "AGENTMESH_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// File created once the worker is consuming, removed on exit.
    #[arg(long, env = "AGENTMESH_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Shadow policy directory: decided on every event without effect, recorded in receipts.
    #[arg(long, env = "AGENTMESH_SHADOW_POLICIES")]
    shadow_policies: Option<PathBuf>,
    /// Seconds an event parked for approval waits before it is denied.
    #[arg(long, env = "AGENTMESH_APPROVAL_TIMEOUT_SECS", default_value_t = 3600)]
    approval_timeout_secs: u64,
    /// Milliseconds a call of a cacheable tool waits for an identical call's result already in flight.
    #[arg(long, env = "AGENTMESH_CACHE_FLIGHT_WAIT_MS", default_value_t = 10_000)]
    cache_flight_wait_ms: u64,
    /// This replica's decision signing key: a file holding an nkey seed
    /// (mode 0600; `meshctl up` writes `.agentmesh/auth/signing/policy-worker.nk`).
    /// Without it, a key for this run only.
    #[arg(long, env = "AGENTMESH_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    /// Health and metrics server, log format, OTLP export.
    #[command(flatten)]
    ops: telemetry::OpsConfig,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let tracing = match telemetry::init_tracing("policy-worker", &args.ops) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("policy-worker: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };

    let signing_key = match &args.signing_key_file {
        Some(path) => match broker_config::credentials::read_signing_key_file(path) {
            Ok(key) => Some(std::sync::Arc::new(key)),
            Err(error) => {
                eprintln!("policy-worker: --signing-key-file: {error}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let config = policy_worker::Config {
        signing_key,
        nats_url: args.nats.nats_url,
        credentials: broker_config::NatsCredentials {
            nkey_seed_file: args.nats.nats_nkey_seed_file,
            creds_file: args.nats.nats_creds,
        },
        policies: args.policies,
        limits: schemas::Limits {
            max_event_bytes: args.max_event_bytes,
        },
        consumer: args.consumer,
        batch: args.batch,
        max_in_flight: args.max_in_flight,
        ack_wait: Duration::from_secs(args.ack_wait_secs.max(1)),
        watch_policies: !args.no_watch,
        ready_file: args.ready_file,
        shadow_policies: args.shadow_policies,
        approval_timeout: Duration::from_secs(args.approval_timeout_secs.max(1)),
        cache_flight_wait: Duration::from_millis(args.cache_flight_wait_ms),
        broker: broker_config::Options {
            replicas: args.stream_replicas,
            ..Default::default()
        },
        ops: args.ops,
        ..Default::default()
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_on_signal(shutdown.clone()));
    let result = policy_worker::run(config, shutdown).await;
    tracing.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("policy-worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

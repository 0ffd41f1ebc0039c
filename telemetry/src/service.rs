//! The service skeleton: what every agentmesh service does around its own
//! work, written once.
//!
//! ```text
//! main.rs:  telemetry::service::main("my-service", &["MY_SERVICE_"], |c: &Config| &c.ops, my_service::run)
//! run:      let mut service = Service::start("my-service", &config.ops).await?;   // /healthz answers
//!           let nats = service.connect(&config.nats).await?;                      // failover, `nats` check
//!           ... set up, register readiness checks on service.health() ...
//!           service.ready(config.ready_file.as_deref())?;                         // ready file
//!           ... work until `shutdown` ...
//!           service.shutdown().await;                                             // file removed, metrics flushed
//! ```
//!
//! [`main`] refuses misspelt environment variables, parses the flags,
//! starts logging, cancels the shutdown token on SIGINT/SIGTERM, runs the
//! service and turns its error into one line on stderr and a failing exit
//! status. [`Service`] is [`Ops`] (health, metrics and their HTTP server)
//! plus the NATS connection and the ready file; [`StartError`] is why any
//! of these could not start, the same for every service.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use broker_config::NatsArgs;
use broker_config::credentials::CredentialsError;
use tokio_util::sync::CancellationToken;

use crate::{Health, Metrics, Ops, OpsConfig};

/// Why a service could not start: the same for every service, which wraps
/// it in its own error (`#[error(transparent)] Start(#[from] StartError)`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The health and metrics server or the OTLP exporter could not start.
    #[error(transparent)]
    Telemetry(#[from] crate::Error),
    /// The NATS credentials could not be read.
    #[error("NATS credentials: {0}")]
    Credentials(#[from] CredentialsError),
    /// No NATS server of the list answered.
    #[error(
        "cannot connect to NATS at `{url}`: {source} (is nats-server running? `meshctl up` starts one; set NATS_URL or --nats-url to point elsewhere)"
    )]
    Connect {
        /// The URL (or comma-separated URLs) tried.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// The ready file could not be written.
    #[error("cannot write the ready file `{}`: {source}", path.display())]
    ReadyFile {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One running service: its [`Ops`], its name on the NATS connection and
/// its ready file.
#[derive(Debug)]
pub struct Service {
    name: &'static str,
    ops: Ops,
    ready: Option<ReadyFile>,
}

impl Service {
    /// Starts the health, metrics and HTTP server ([`Ops::start`]) first,
    /// so `/healthz` answers while the service sets itself up.
    pub async fn start(name: &'static str, config: &OpsConfig) -> Result<Self, StartError> {
        Ok(Self {
            name,
            ops: Ops::start(name, config).await?,
            ready: None,
        })
    }

    /// The readiness checks.
    pub fn health(&self) -> &Health {
        self.ops.health()
    }

    /// The instruments.
    pub fn metrics(&self) -> &Metrics {
        self.ops.metrics()
    }

    /// Where the health and metrics server listens, when it runs.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.ops.local_addr()
    }

    /// Connects to NATS as `nats` says (credentials, and a comma-separated
    /// list of nodes tried in order with failover between them,
    /// `schemas::servers::connect`), named after the service, and adds the
    /// readiness check `nats` (connected now).
    pub async fn connect(&self, nats: &NatsArgs) -> Result<async_nats::Client, StartError> {
        let options = nats
            .credentials
            .apply(async_nats::ConnectOptions::new().name(self.name))
            .await?;
        let client = schemas::servers::connect(options, &nats.url)
            .await
            .map_err(|source| StartError::Connect {
                url: nats.url.clone(),
                source,
            })?;
        let state = client.clone();
        self.health().probe("nats", move || {
            state.connection_state() == async_nats::connection::State::Connected
        });
        Ok(client)
    }

    /// Writes the ready file at `path` (when given): the process id and a
    /// newline. It is removed at [`Service::shutdown`], or when the service
    /// is dropped (an error after this point).
    pub fn ready(&mut self, path: Option<&Path>) -> Result<(), StartError> {
        if let Some(path) = path {
            std::fs::write(path, format!("{}\n", std::process::id())).map_err(|source| {
                StartError::ReadyFile {
                    path: path.to_owned(),
                    source,
                }
            })?;
            self.ready = Some(ReadyFile(path.to_owned()));
        }
        Ok(())
    }

    /// Removes the ready file, stops the HTTP server and exports the last
    /// metrics.
    pub async fn shutdown(mut self) {
        drop(self.ready.take());
        self.ops.shutdown().await;
    }
}

/// A file that exists while the service is ready.
#[derive(Debug)]
struct ReadyFile(PathBuf);

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A service binary's `main`, after the runtime started: refuses an unknown
/// environment variable starting with one of `env_prefixes`
/// ([`crate::check_env`]), parses the flags `C`, starts logging with the
/// [`OpsConfig`] that `ops` picks from them, cancels the token given to
/// `run` on SIGINT or SIGTERM, and runs. An error (from any of these) is
/// logged and printed as `<name>: <error>: <its causes>` on stderr, with a
/// failing exit status.
pub async fn main<C, E, F>(
    name: &'static str,
    env_prefixes: &[&str],
    ops: impl FnOnce(&C) -> &OpsConfig,
    run: impl FnOnce(C, CancellationToken) -> F,
) -> ExitCode
where
    C: clap::Parser,
    E: std::error::Error,
    F: Future<Output = Result<(), E>>,
{
    if let Err(error) = crate::check_env(&C::command(), env_prefixes) {
        eprintln!("{name}: {}", chain(&error));
        return ExitCode::FAILURE;
    }
    let config = C::parse();
    let tracing = match crate::init_tracing(name, ops(&config)) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("{name}: {}", chain(&error));
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
    let result = run(config, shutdown).await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let error = chain(&error);
            tracing::error!(%error, "{name} failed.");
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    };
    tracing.shutdown().await;
    code
}

/// `error` and each of its causes that its message does not already say,
/// joined by `: `.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_each_cause_once() {
        let io = std::io::Error::other("disk full");
        let start = StartError::ReadyFile {
            path: "/run/ready".into(),
            source: io,
        };
        assert_eq!(
            chain(&start),
            "cannot write the ready file `/run/ready`: disk full"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(
            chain(&Outer(std::io::Error::other("inner"))),
            "outer: inner"
        );
    }

    #[tokio::test]
    async fn the_ready_file_holds_the_pid_until_shutdown() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = std::env::temp_dir().join(format!("telemetry-ready-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("ready");
        let mut service = Service::start("test", &OpsConfig::default()).await?;
        service.ready(None)?;
        assert!(!path.exists());
        service.ready(Some(&path))?;
        assert_eq!(
            std::fs::read_to_string(&path)?,
            format!("{}\n", std::process::id())
        );
        service.shutdown().await;
        assert!(!path.exists(), "ready file left behind");

        let error = Service::start("test", &OpsConfig::default())
            .await?
            .ready(Some(&dir.join("missing").join("ready")))
            .unwrap_err();
        assert!(error.to_string().contains("ready file"), "{error}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn no_server_is_an_error_that_names_the_url_and_the_fix() {
        let service = Service::start("test", &OpsConfig::default()).await.unwrap();
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("nats://127.0.0.1:{port}");
        let error = service
            .connect(&NatsArgs::url(url.clone()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&url) && error.contains("--nats-url"),
            "{error}"
        );
        assert!(!service.health().is_ready());
    }
}

//! What each service binary repeats around its `run`: the NATS connection
//! flags and the shutdown on SIGINT or SIGTERM.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

/// The NATS connection flags (and their environment variables), flattened
/// into the arguments of `policy-worker` and `gpu-scaler`.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// File holding this service's NATS nkey seed (`SU…`, mode 0600), for a broker with authorization.
    #[arg(long, env = "NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// NATS `.creds` file (user JWT and seed), for a broker in operator mode.
    #[arg(long, env = "NATS_CREDS", conflicts_with = "nats_nkey_seed_file")]
    pub nats_creds: Option<PathBuf>,
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM (on Ctrl-C elsewhere),
/// logging that the service is shutting down. Spawn it before `run`. A
/// signal that cannot be listened for is logged and left out; the service
/// keeps running on the other.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let wait = |kind: SignalKind, name: &'static str| async move {
            match signal(kind) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot listen for {name}; stop the service another way.");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(SignalKind::terminate(), "SIGTERM") => {}
            () = wait(SignalKind::interrupt(), "SIGINT") => {}
        }
    }
    #[cfg(not(unix))]
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::warn!(%error, "Cannot listen for Ctrl-C; stop the service another way.");
        std::future::pending::<()>().await;
    }
    tracing::info!("Shutting down.");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        nats: NatsArgs,
    }

    #[test]
    fn flags_keep_their_names_and_refuse_two_credentials() {
        let args = Args::try_parse_from([
            "svc",
            "--nats-url",
            "nats://n:4222",
            "--nats-nkey-seed-file",
            "/k.nk",
        ])
        .unwrap();
        assert_eq!(args.nats.nats_url, "nats://n:4222");
        assert_eq!(args.nats.nats_nkey_seed_file, Some(PathBuf::from("/k.nk")));
        let both = Args::try_parse_from([
            "svc",
            "--nats-nkey-seed-file",
            "/k.nk",
            "--nats-creds",
            "/u.creds",
        ]);
        assert!(both.is_err());
    }
}

//! What each service binary repeats around its `run`: the shutdown on SIGINT
//! or SIGTERM. (The NATS flags are `broker_config::NatsArgs`.)

use tokio_util::sync::CancellationToken;

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

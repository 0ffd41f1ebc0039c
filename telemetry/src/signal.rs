//! SIGINT/SIGTERM, listened for the same way by every service and by
//! `meshctl`'s long-running commands (`ui`, `tail`, `up` in the
//! foreground).

use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGINT or SIGTERM (on Ctrl-C elsewhere). A signal
/// that cannot be listened for is logged and left out; the other still
/// counts.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let wait = |kind: SignalKind, name: &'static str| async move {
            match signal(kind) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot listen for {name}; stop the process another way.");
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
        tracing::warn!(%error, "Cannot listen for Ctrl-C; stop the process another way.");
        std::future::pending::<()>().await;
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM ([`signal`]), logging
/// that the process is shutting down. Spawn it before the work it stops.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    signal().await;
    tracing::info!("Shutting down.");
    shutdown.cancel();
}

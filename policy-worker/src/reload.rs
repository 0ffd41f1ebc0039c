//! Hot reload: on a change in the policy directory (and on SIGHUP) the new
//! set is loaded and validated off the hot path, then swapped in atomically.
//! An invalid new set is refused and the active one stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use policy_engine::PolicyBundle;

/// Keeps the file watcher alive while the worker runs.
pub(crate) struct Reloader {
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Starts the reload task.
pub(crate) fn spawn(
    dir: PathBuf,
    watch_files: bool,
    policies: watch::Sender<Arc<PolicyBundle>>,
    shutdown: CancellationToken,
) -> Result<Reloader, crate::Error> {
    let (tx, mut rx) = mpsc::channel::<&'static str>(16);
    let watcher = if watch_files {
        let file_tx = tx.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = file_tx.try_send("file change");
                }
            })
            .map_err(|source| crate::Error::Watch {
                dir: dir.clone(),
                source,
            })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| crate::Error::Watch {
                dir: dir.clone(),
                source,
            })?;
        Some(watcher)
    } else {
        None
    };

    #[cfg(unix)]
    {
        let hup_tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("Cannot listen for SIGHUP; reload on file change only.");
                return;
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    Some(()) = hup.recv() => { let _ = hup_tx.send("SIGHUP").await; }
                }
            }
        });
    }
    drop(tx);

    tokio::spawn(async move {
        loop {
            let cause = tokio::select! {
                _ = shutdown.cancelled() => return,
                cause = rx.recv() => match cause { Some(c) => c, None => return },
            };
            // Editors write files in several steps; wait until the directory
            // has been quiet for a moment before reading it.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(150), rx.recv()).await
            {}
            let dir = dir.clone();
            let loaded = tokio::task::spawn_blocking(move || PolicyBundle::load(&dir)).await;
            match loaded {
                Ok(Ok(bundle)) => {
                    let old = policies.borrow().hash().to_owned();
                    if old == bundle.hash() {
                        tracing::debug!(cause, policy_hash = %old, "Policies unchanged.");
                        continue;
                    }
                    tracing::info!(cause, old_hash = %old, policy_hash = bundle.hash(), policies = bundle.len(), "Policies reloaded.");
                    policies.send_replace(Arc::new(bundle));
                }
                Ok(Err(error)) => {
                    tracing::error!(cause, %error, policy_hash = %policies.borrow().hash(), "Policy reload refused; the active set stays.");
                }
                Err(error) => {
                    tracing::error!(%error, "Policy reload task failed; the active set stays.")
                }
            }
        }
    });
    Ok(Reloader { _watcher: watcher })
}

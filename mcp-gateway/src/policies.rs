//! The active policy set, as the worker loads it from the same directory:
//! `tools/list` asks it which tools a caller may call. A change in the
//! directory is loaded off the request path and swapped in; an invalid new
//! set is refused and the active one stays (as in the worker). Every swap is
//! announced on a watch channel, so sessions send `tools/list_changed`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use policy_engine::PolicyBundle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// The active set and its changes.
#[derive(Clone)]
pub(crate) struct Policies {
    dir: PathBuf,
    active: watch::Sender<Arc<PolicyBundle>>,
}

/// Keeps the directory watcher alive.
pub(crate) struct Reloader {
    _watcher: notify::RecommendedWatcher,
}

impl Policies {
    /// Loads the set in `dir`.
    pub(crate) fn load(dir: PathBuf) -> Result<Self, Error> {
        let bundle = PolicyBundle::load(&dir).map_err(|source| Error::Policies {
            dir: dir.clone(),
            source,
        })?;
        tracing::info!(
            policy_hash = bundle.hash(),
            policies = bundle.len(),
            "Policies loaded."
        );
        let (active, _) = watch::channel(Arc::new(bundle));
        Ok(Self { dir, active })
    }

    /// The active set.
    pub(crate) fn current(&self) -> Arc<PolicyBundle> {
        self.active.borrow().clone()
    }

    /// Changes of the active set, from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<PolicyBundle>> {
        self.active.subscribe()
    }

    /// Reloads the set whenever the directory changes, until `shutdown`.
    pub(crate) fn watch(&self, shutdown: CancellationToken) -> Result<Reloader, Error> {
        let (tx, mut rx) = mpsc::channel::<()>(16);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.try_send(());
                }
            })
            .map_err(|source| Error::Watch {
                dir: self.dir.clone(),
                source,
            })?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch {
                dir: self.dir.clone(),
                source,
            })?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    change = rx.recv() => if change.is_none() { return },
                }
                // Editors write in several steps: wait for a quiet moment.
                while let Ok(Some(())) =
                    tokio::time::timeout(Duration::from_millis(150), rx.recv()).await
                {
                }
                let dir = this.dir.clone();
                match tokio::task::spawn_blocking(move || PolicyBundle::load(&dir)).await {
                    Ok(Ok(bundle)) if bundle.hash() != this.current().hash() => {
                        tracing::info!(policy_hash = bundle.hash(), "Policies reloaded.");
                        this.active.send_replace(Arc::new(bundle));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::error!(%error, "Policy reload refused; the active set stays.");
                    }
                    Err(error) => tracing::error!(%error, "Policy reload task failed."),
                }
            }
        });
        Ok(Reloader { _watcher: watcher })
    }
}

//! The gateway's connections: one agents-sdk [`Agent`] per calling agent,
//! connected with that agent's own key (`<keys dir>/<id>.nk`), so the broker
//! authorizes what the gateway publishes for a client exactly as it would
//! the agent's own process. Each connection also reads `mesh-agents` (every
//! agent may) and keeps the cards current from its watch; a change is
//! announced to every session ([`Pool::subscribe`]).
//!
//! A connection is made on the agent's first request and kept; one that
//! fails is not kept, so the next request tries again.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use agents_sdk::{Agent, AgentCard, CardChange};
use futures::StreamExt as _;
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;

/// One calling agent's connection and its view of the cards.
pub(crate) struct Link {
    /// The agent the gateway acts as.
    pub agent: Agent,
    cards: RwLock<BTreeMap<String, AgentCard>>,
    /// The pool's: bumped on every change of the cards.
    changed: Arc<watch::Sender<u64>>,
}

impl Link {
    /// The cards as last read.
    pub(crate) fn cards(&self) -> Vec<AgentCard> {
        self.cards
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    fn apply(&self, change: CardChange) {
        if let Ok(mut cards) = self.cards.write() {
            match change {
                CardChange::Registered(card) => {
                    if cards.get(&card.id) == Some(&card) {
                        return;
                    }
                    cards.insert(card.id.clone(), card);
                }
                CardChange::Removed(id) => {
                    if cards.remove(&id).is_none() {
                        return;
                    }
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Why the gateway could not act as an agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("connecting as agent `{agent}`: {source}")]
    Connect {
        agent: String,
        source: agents_sdk::ConnectError,
    },
    #[error("reading `mesh-agents` as agent `{agent}`: {source}")]
    Directory {
        agent: String,
        source: agents_sdk::DirectoryError,
    },
    #[error(
        "no key for agent `{agent}` at `{}`: register it with `meshctl agents add {agent}` and point --agent-keys-dir at the seeds",
        path.display()
    )]
    NoKey { agent: String, path: PathBuf },
}

/// The connections, by agent id.
pub(crate) struct Pool {
    nats_url: String,
    keys_dir: PathBuf,
    insecure: bool,
    call_timeout: Duration,
    shutdown: CancellationToken,
    links: Mutex<HashMap<String, Arc<OnceCell<Arc<Link>>>>>,
    /// Bumped whenever any connection sees the cards change (every
    /// connection sees the same bucket).
    changed: Arc<watch::Sender<u64>>,
}

impl Pool {
    pub(crate) fn new(
        nats_url: String,
        keys_dir: PathBuf,
        insecure: bool,
        call_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            nats_url,
            keys_dir,
            insecure,
            call_timeout,
            shutdown,
            links: Mutex::new(HashMap::new()),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    /// Changes of the cards, from now on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The connection of `agent`, made on first use.
    pub(crate) async fn link(&self, agent: &str) -> Result<Arc<Link>, LinkError> {
        let cell = {
            let Ok(mut links) = self.links.lock() else {
                return Err(LinkError::NoKey {
                    agent: agent.to_owned(),
                    path: self.keys_dir.clone(),
                });
            };
            links.entry(agent.to_owned()).or_default().clone()
        };
        cell.get_or_try_init(|| self.connect(agent)).await.cloned()
    }

    async fn connect(&self, agent: &str) -> Result<Arc<Link>, LinkError> {
        let key = self.keys_dir.join(format!("{agent}.nk"));
        let mut builder = Agent::builder(agent)
            // The gateway publishes the caller's calls; the caller's own
            // process (if any) owns its card.
            .register_card(false)
            .call_timeout(self.call_timeout);
        if key.is_file() {
            builder = builder.nkey_file(&key);
        } else if !self.insecure {
            return Err(LinkError::NoKey {
                agent: agent.to_owned(),
                path: key,
            });
        }
        let connected =
            builder
                .connect(&self.nats_url)
                .await
                .map_err(|source| LinkError::Connect {
                    agent: agent.to_owned(),
                    source,
                })?;
        let directory = connected.directory().clone();
        let current = directory
            .list()
            .await
            .map_err(|source| LinkError::Directory {
                agent: agent.to_owned(),
                source,
            })?;
        let mut watch = directory
            .watch()
            .await
            .map_err(|source| LinkError::Directory {
                agent: agent.to_owned(),
                source,
            })?;
        let link = Arc::new(Link {
            agent: connected,
            cards: RwLock::new(current.into_iter().map(|c| (c.id.clone(), c)).collect()),
            changed: self.changed.clone(),
        });
        tracing::info!(agent, "Connected as agent.");
        let weak = Arc::downgrade(&link);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    change = watch.next() => change,
                };
                let Some(link) = weak.upgrade() else { return };
                match change {
                    Some(Ok(change)) => link.apply(change),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "Reading card changes failed.");
                    }
                    None => return,
                }
            }
        });
        Ok(link)
    }
}

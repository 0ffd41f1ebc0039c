//! The input schemas of the agents' cards (`mesh-agents`), for checking a
//! `tool.call`'s arguments before it is decided (`docs/contract.md`,
//! "Invalid"; the check itself is `policy_engine::CardSchemas`).
//!
//! A card is read the first time a call names its agent as target and
//! compiled once per revision (the bucket stream's sequence); a poller
//! follows the bucket's stream and recompiles a card when it changes. Both
//! only ever replace an entry with a newer revision, so they converge on
//! the latest card. Reads are direct gets, as for every bucket the worker
//! reads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    message::StreamMessage,
    stream::{DirectGetErrorKind, Stream},
};
use policy_engine::CardSchemas;
use schemas::MeshEvent;
use tokio_util::sync::CancellationToken;

/// How often the poller looks for card changes.
const POLL: Duration = Duration::from_millis(250);

/// One agent's card as last read: its revision and its schemas (`None`: no
/// card, or one that does not parse, so nothing is checked).
struct Entry {
    revision: u64,
    schemas: Option<CardSchemas>,
}

/// The compiled cards, by agent id.
pub(crate) struct Cards {
    stream: Stream,
    /// `$KV.<bucket>.`
    prefix: String,
    known: RwLock<HashMap<String, Arc<Entry>>>,
}

impl Cards {
    /// Opens `mesh-agents` and starts following its changes until `shutdown`.
    pub(crate) async fn open(
        js: &jetstream::Context,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, async_nats::Error> {
        let kv = js.get_key_value(schemas::subjects::BUCKET_AGENTS).await?;
        let mut stream = kv.stream.clone();
        let last = stream.info().await?.state.last_sequence;
        let cards = Arc::new(Self {
            stream,
            prefix: kv.prefix.clone(),
            known: RwLock::new(HashMap::new()),
        });
        tokio::spawn(cards.clone().follow(last + 1, shutdown));
        Ok(cards)
    }

    /// Checks a `tool.call`'s arguments against the input schema its
    /// target's card gives the tool: `Err` with the first violations.
    /// Anything else, and a call whose target's card cannot be read now
    /// (logged), passes.
    pub(crate) async fn check(&self, event: &MeshEvent) -> Result<(), Vec<String>> {
        let Some(target) = policy_engine::card_agent(event) else {
            return Ok(());
        };
        let entry = match self.cached(target) {
            Some(entry) => entry,
            None => match Box::pin(self.read(target)).await {
                Some(entry) => entry,
                None => return Ok(()),
            },
        };
        match &entry.schemas {
            Some(schemas) => schemas.check_event(event),
            None => Ok(()),
        }
    }

    fn cached(&self, agent: &str) -> Option<Arc<Entry>> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.get(agent).cloned()
    }

    /// Reads `agent`'s current card from the bucket and keeps it.
    async fn read(&self, agent: &str) -> Option<Arc<Entry>> {
        let entry = match self
            .stream
            .direct_get_last_for_subject(format!("{}{agent}", self.prefix))
            .await
        {
            Ok(message) => compile(agent, &message),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Entry {
                revision: 0,
                schemas: None,
            },
            Err(error) => {
                tracing::warn!(agent, %error, "Cannot read the agent's card; its tool calls are not checked against an input schema until it can be read.");
                return None;
            }
        };
        Some(self.keep(agent, entry))
    }

    /// Keeps `entry` unless a newer revision is already kept; returns what
    /// is kept.
    fn keep(&self, agent: &str, entry: Entry) -> Arc<Entry> {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        match known.get(agent) {
            Some(kept) if kept.revision >= entry.revision => kept.clone(),
            _ => {
                let entry = Arc::new(entry);
                known.insert(agent.to_owned(), entry.clone());
                entry
            }
        }
    }

    /// Reads every change of the bucket from sequence `next` on.
    async fn follow(self: Arc<Self>, mut next: u64, shutdown: CancellationToken) {
        let filter = format!("{}>", self.prefix);
        loop {
            loop {
                match self
                    .stream
                    .direct_get_next_for_subject(filter.as_str(), Some(next))
                    .await
                {
                    Ok(message) => {
                        next = message.sequence + 1;
                        if let Some(agent) = message.subject.as_str().strip_prefix(&self.prefix) {
                            let entry = compile(agent, &message);
                            self.keep(agent, entry);
                        }
                    }
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                    Err(error) => {
                        tracing::debug!(%error, "Reading card changes failed; retrying.");
                        break;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// The entry a stored message of the bucket makes: a deleted or purged
/// card, or one that does not parse, checks nothing.
fn compile(agent: &str, message: &StreamMessage) -> Entry {
    let removed = matches!(
        message.headers.get("KV-Operation").map(|v| v.as_str()),
        Some("DEL" | "PURGE")
    );
    let schemas = if removed {
        None
    } else {
        match CardSchemas::compile(&message.payload) {
            Ok(schemas) => Some(schemas),
            Err(error) => {
                tracing::warn!(agent, %error, "The agent's card does not parse; its tool calls are not checked against an input schema.");
                None
            }
        }
    };
    Entry {
        revision: message.sequence,
        schemas,
    }
}

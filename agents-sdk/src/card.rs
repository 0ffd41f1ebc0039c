//! Discovery: agent cards in the `mesh-agents` KV bucket (key = agent id),
//! with the fields of an A2A agent card (name, description, version, skills,
//! capabilities, default input and output modes, and, for an agent that
//! answers A2A, an interface entry naming the A2A-over-NATS binding of
//! `docs/a2a.md`) and the tools the agent serves, each with its JSON input
//! schema.
//!
//! Cards describe; they do not authorise. Any agent may write any card it is
//! allowed to write to the bucket. What an agent may do is decided only by
//! the policy worker, from Cedar policies and operator-owned entities.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::jetstream::{self, kv};
use futures::{Stream, StreamExt};
use schemas::{AgentId, subjects};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DirectoryError, DirectoryErrorKind};

/// The `protocolBinding` of the interface entry in a mesh agent's card.
pub const PROTOCOL_BINDING: &str = "AGENTMESH+NATS";
/// The A2A protocol version of the interface entry.
pub const PROTOCOL_VERSION: &str = "1.0";

/// The interface `url` of agent `id` on the mesh: `urn:agentmesh:agent:<id>`.
pub fn interface_url(id: &str) -> String {
    format!("urn:agentmesh:agent:{id}")
}

/// An agent card: what an agent says about itself (A2A agent-card fields,
/// plus the tools it serves).
///
/// ```
/// use agents_sdk::{AgentCard, Skill, ToolSpec};
/// use serde_json::json;
///
/// let card = AgentCard::new("coder")
///     .description("Reads and changes the repository")
///     .version("1.2.0")
///     .skill(Skill::new("rust", "Rust programming").tag("code"))
///     .tool(ToolSpec::new("repo.read").description("Read a file").input_schema(json!({
///         "type": "object",
///         "properties": {"path": {"type": "string"}},
///         "required": ["path"]
///     })));
/// assert!(card.serves("repo.read"));
/// assert!(card.has_skill("code"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCard {
    /// The agent id (the KV key).
    #[serde(default)]
    pub id: String,
    /// A human-readable name (defaults to the id).
    pub name: String,
    /// What the agent does.
    #[serde(default)]
    pub description: String,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// What the agent can do.
    #[serde(default)]
    pub skills: Vec<Skill>,
    /// The tools it serves through `tool.call` events.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// What the agent supports (A2A `AgentCapabilities`).
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The media types the agent accepts (A2A `defaultInputModes`).
    #[serde(default = "default_modes")]
    pub default_input_modes: Vec<String>,
    /// The media types the agent answers with (A2A `defaultOutputModes`).
    #[serde(default = "default_modes")]
    pub default_output_modes: Vec<String>,
    /// Where and how the agent answers A2A requests (A2A
    /// `supportedInterfaces`): on the mesh, one entry whose
    /// `protocolBinding` is [`a2a::PROTOCOL_BINDING`](PROTOCOL_BINDING).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supported_interfaces: Vec<AgentInterface>,
}

fn default_modes() -> Vec<String> {
    vec!["text/plain".to_owned(), "application/json".to_owned()]
}

/// The optional A2A features an agent supports (A2A `AgentCapabilities`).
/// Over the mesh neither streaming nor push notifications are offered: a
/// request's answer carries the finished task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Streaming answers (`SendStreamingMessage`).
    #[serde(default)]
    pub streaming: bool,
    /// Push notifications of task updates.
    #[serde(default)]
    pub push_notifications: bool,
}

/// One way to reach the agent over A2A (A2A `AgentInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInterface {
    /// Where: on the mesh, `urn:agentmesh:agent:<id>`.
    pub url: String,
    /// How: on the mesh, `AGENTMESH+NATS`.
    pub protocol_binding: String,
    /// The A2A version spoken.
    #[serde(default)]
    pub protocol_version: String,
}

impl AgentCard {
    /// A card for agent `id`, named after it, version `0.1.0`.
    pub fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        Self {
            name: id.clone(),
            id,
            description: String::new(),
            version: "0.1.0".to_owned(),
            skills: Vec::new(),
            tools: Vec::new(),
            capabilities: Capabilities::default(),
            default_input_modes: default_modes(),
            default_output_modes: default_modes(),
            supported_interfaces: Vec::new(),
        }
    }

    /// Lists the A2A-over-NATS interface (`docs/a2a.md`): the agent answers
    /// A2A requests sent to it through the mesh.
    pub fn a2a_interface(mut self) -> Self {
        if !self.serves_a2a() {
            self.supported_interfaces.push(AgentInterface {
                url: interface_url(&self.id),
                protocol_binding: PROTOCOL_BINDING.to_owned(),
                protocol_version: PROTOCOL_VERSION.to_owned(),
            });
        }
        self
    }

    /// Whether the card lists the A2A-over-NATS interface.
    pub fn serves_a2a(&self) -> bool {
        self.supported_interfaces
            .iter()
            .any(|i| i.protocol_binding == PROTOCOL_BINDING)
    }

    /// Sets the human-readable name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds a skill.
    pub fn skill(mut self, skill: Skill) -> Self {
        self.skills.push(skill);
        self
    }

    /// Adds a served tool (replacing one of the same name).
    pub fn tool(mut self, tool: ToolSpec) -> Self {
        self.tools.retain(|t| t.name != tool.name);
        self.tools.push(tool);
        self
    }

    /// Whether a skill has this id or tag.
    pub fn has_skill(&self, skill: &str) -> bool {
        self.skills
            .iter()
            .any(|s| s.id == skill || s.tags.iter().any(|t| t == skill))
    }

    /// Whether the card lists this tool.
    pub fn serves(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t.name == tool)
    }
}

/// One skill of an agent card (A2A `AgentSkill`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Skill {
    /// A unique id within the card.
    pub id: String,
    /// A human-readable name.
    pub name: String,
    /// What the skill does.
    #[serde(default)]
    pub description: String,
    /// Keywords to find it by.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Example requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

impl Skill {
    /// A skill with this id and name.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            tags: Vec::new(),
            examples: Vec::new(),
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds an example request.
    pub fn example(mut self, example: impl Into<String>) -> Self {
        self.examples.push(example.into());
        self
    }
}

/// A tool an agent serves, with the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// The tool name, as callers put it in a `tool.call`'s `subject`.
    pub name: String,
    /// What the tool does.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the arguments (default: any object).
    #[serde(default = "any_object")]
    pub input_schema: Value,
}

fn any_object() -> Value {
    serde_json::json!({"type": "object"})
}

impl ToolSpec {
    /// A tool with this name taking any JSON object.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            input_schema: any_object(),
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the JSON Schema of the arguments.
    pub fn input_schema(mut self, schema: Value) -> Self {
        self.input_schema = schema;
        self
    }
}

/// The cards in `mesh-agents`: register, list, watch, and find agents by
/// skill or tool.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let directory = agents_sdk::Directory::open(&async_nats::jetstream::new(client)).await?;
/// for card in directory.find_by_skill("code").await? {
///     println!("{}: {}", card.id, card.description);
/// }
/// # Ok(())
/// # }
/// ```
///
/// Listing and watching read the bucket's stream (stream information and
/// direct gets) rather than creating consumers, which an agent on a mesh
/// with authorization may not do.
#[derive(Debug, Clone)]
pub struct Directory {
    kv: kv::Store,
    client: async_nats::Client,
}

impl Directory {
    /// Opens the `mesh-agents` bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Self, DirectoryError> {
        match js.get_key_value(subjects::BUCKET_AGENTS).await {
            Ok(kv) => Ok(Self {
                kv,
                client: js.client(),
            }),
            Err(e) => {
                let missing = matches!(e.kind(), jetstream::context::KeyValueErrorKind::GetBucket)
                    && e.to_string().contains("not found");
                if missing {
                    Err(DirectoryError::new(DirectoryErrorKind::MissingBucket))
                } else {
                    Err(DirectoryError::with_source(DirectoryErrorKind::Broker, e))
                }
            }
        }
    }

    /// Writes `card` under its id, replacing the agent's previous card.
    pub async fn register(&self, card: &AgentCard) -> Result<u64, DirectoryError> {
        if !AgentId::is_valid(&card.id) {
            return Err(DirectoryErrorKind::InvalidId(card.id.clone()).into());
        }
        let body = serde_json::to_vec(card).map_err(|e| {
            DirectoryError::with_source(DirectoryErrorKind::Decode(card.id.clone()), e)
        })?;
        self.kv
            .put(&card.id, body.into())
            .await
            .map_err(|e| DirectoryError::with_source(DirectoryErrorKind::Broker, e))
    }

    /// Deletes agent `id`'s card.
    pub async fn remove(&self, id: &str) -> Result<(), DirectoryError> {
        self.kv
            .delete(id)
            .await
            .map_err(|e| DirectoryError::with_source(DirectoryErrorKind::Broker, e))
    }

    /// Agent `id`'s card, if it has one.
    pub async fn get(&self, id: &str) -> Result<Option<AgentCard>, DirectoryError> {
        let value = self
            .kv
            .get(id)
            .await
            .map_err(|e| DirectoryError::with_source(DirectoryErrorKind::Broker, e))?;
        value.map(|bytes| parse_card(id, &bytes)).transpose()
    }

    /// The keys that have (or had) a card: the subjects of the bucket's
    /// stream, read from its stream information.
    async fn keys(&self) -> Result<Vec<String>, DirectoryError> {
        let broker = |e| DirectoryError::with_source(DirectoryErrorKind::Broker, e);
        let mut listing = self
            .kv
            .stream
            .info_with_subjects(format!("{}>", self.kv.prefix))
            .await
            .map_err(broker)?;
        let mut keys = Vec::new();
        while let Some(entry) = listing.next().await {
            let (subject, _count) = entry.map_err(broker)?;
            if let Some(key) = subject.strip_prefix(self.kv.prefix.as_str()) {
                keys.push(key.to_owned());
            }
        }
        Ok(keys)
    }

    /// Every card, sorted by agent id. Cards that do not parse are skipped
    /// (and logged): one bad writer must not hide every other agent.
    pub async fn list(&self) -> Result<Vec<AgentCard>, DirectoryError> {
        let keys = self.keys().await?;
        let mut cards = Vec::with_capacity(keys.len());
        // The cards are read CARD_READS at a time rather than one by one.
        let mut reads = futures::stream::iter(keys)
            .map(|key| async move {
                let card = self.get(&key).await;
                (key, card)
            })
            .buffer_unordered(CARD_READS);
        while let Some((key, card)) = reads.next().await {
            match card {
                Ok(Some(card)) => cards.push(card),
                Ok(None) => {}
                Err(e) if matches!(e.kind_ref(), DirectoryErrorKind::Decode(_)) => {
                    tracing::warn!(agent = %key, error = %e, "Skipping an agent card that does not parse.");
                }
                Err(e) => return Err(e),
            }
        }
        cards.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cards)
    }

    /// Cards with a skill of this id or tag.
    pub async fn find_by_skill(&self, skill: &str) -> Result<Vec<AgentCard>, DirectoryError> {
        let mut cards = self.list().await?;
        cards.retain(|c| c.has_skill(skill));
        Ok(cards)
    }

    /// Cards that list this tool.
    pub async fn find_by_tool(&self, tool: &str) -> Result<Vec<AgentCard>, DirectoryError> {
        let mut cards = self.list().await?;
        cards.retain(|c| c.serves(tool));
        Ok(cards)
    }

    /// The agents that answer A2A requests over the mesh (their cards list
    /// the A2A-over-NATS interface).
    pub async fn find_a2a(&self) -> Result<Vec<AgentCard>, DirectoryError> {
        let mut cards = self.list().await?;
        cards.retain(AgentCard::serves_a2a);
        Ok(cards)
    }

    /// Every current card, then every change as it happens.
    ///
    /// ```no_run
    /// # async fn demo(directory: agents_sdk::Directory) -> Result<(), Box<dyn std::error::Error>> {
    /// use agents_sdk::CardChange;
    /// use futures::StreamExt;
    ///
    /// let mut changes = directory.watch().await?;
    /// while let Some(change) = changes.next().await {
    ///     match change? {
    ///         CardChange::Registered(card) => println!("{} serves {:?}", card.id, card.tools),
    ///         CardChange::Removed(id) => println!("{id} is gone"),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn watch(&self) -> Result<CardWatch, DirectoryError> {
        let broker =
            |e: crate::error::BoxError| DirectoryError::with_source(DirectoryErrorKind::Broker, e);
        // Changes are read from the bucket's stream in order, by sequence
        // (direct gets, no consumer). A subscription on the cards' subjects
        // wakes the reader early; it does not see every change (on a mesh
        // with authorization, other agents' writes reach this account only
        // through the stream), so the reader also looks every second.
        let mut wake = self
            .client
            .subscribe(format!("{}>", self.kv.prefix))
            .await
            .map_err(|e| broker(e.into()))?;
        let mut stream = self.kv.stream.clone();
        let last = stream
            .info()
            .await
            .map_err(|e| broker(e.into()))?
            .state
            .last_sequence;
        let current = self.list().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let prefix = self.kv.prefix.clone();
        tokio::spawn(async move {
            let filter = format!("{prefix}>");
            let mut next = last + 1;
            loop {
                loop {
                    match stream
                        .direct_get_next_for_subject(&filter, Some(next))
                        .await
                    {
                        Ok(message) => {
                            next = message.sequence + 1;
                            if let Some(change) = card_change(&prefix, &message)
                                && tx.send(change).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "Reading card changes failed; retrying.");
                            break;
                        }
                    }
                }
                tokio::select! {
                    () = tx.closed() => return,
                    woke = wake.next() => if woke.is_none() { return },
                    () = tokio::time::sleep(WATCH_POLL) => {}
                }
            }
        });
        let changes = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|change| (change, rx))
        });
        let all = futures::stream::iter(
            current
                .into_iter()
                .map(|card| Ok(CardChange::Registered(card))),
        )
        .chain(changes);
        Ok(CardWatch {
            inner: Box::pin(all),
        })
    }
}

/// How many cards [`Directory::list`] reads at once.
const CARD_READS: usize = 16;

/// How often [`Directory::watch`] looks for changes when nothing woke it.
const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The change a stored message of the bucket makes; `None` for one that is
/// not about a card or does not parse.
fn card_change(
    prefix: &str,
    message: &jetstream::message::StreamMessage,
) -> Option<Result<CardChange, DirectoryError>> {
    let key = message.subject.as_str().strip_prefix(prefix)?.to_owned();
    let operation = message
        .headers
        .get("KV-Operation")
        .map(|v| v.as_str().to_owned());
    match operation.as_deref() {
        Some("DEL") | Some("PURGE") => Some(Ok(CardChange::Removed(key))),
        _ => match parse_card(&key, &message.payload) {
            Ok(card) => Some(Ok(CardChange::Registered(card))),
            Err(e) => {
                tracing::warn!(agent = %key, error = %e, "Skipping an agent card that does not parse.");
                None
            }
        },
    }
}

fn parse_card(key: &str, bytes: &[u8]) -> Result<AgentCard, DirectoryError> {
    let mut card: AgentCard = serde_json::from_slice(bytes)
        .map_err(|e| DirectoryError::with_source(DirectoryErrorKind::Decode(key.to_owned()), e))?;
    // The key is the authority on which agent a card belongs to.
    card.id = key.to_owned();
    Ok(card)
}

/// A change in `mesh-agents`.
#[derive(Debug, Clone, PartialEq)]
pub enum CardChange {
    /// An agent wrote (or rewrote) its card.
    Registered(AgentCard),
    /// An agent's card was deleted.
    Removed(String),
}

/// The stream of [`Directory::watch`].
pub struct CardWatch {
    inner: Pin<Box<dyn Stream<Item = Result<CardChange, DirectoryError>> + Send>>,
}

impl Stream for CardWatch {
    type Item = Result<CardChange, DirectoryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn card_json_uses_a2a_names() {
        let card = AgentCard::new("coder")
            .skill(Skill::new("rust", "Rust").tag("code"))
            .tool(
                ToolSpec::new("repo.read")
                    .input_schema(json!({"type": "object", "required": ["path"]})),
            );
        let v = serde_json::to_value(&card).unwrap();
        assert_eq!(v["name"], "coder");
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["skills"][0]["tags"][0], "code");
        assert_eq!(v["tools"][0]["inputSchema"]["required"][0], "path");
    }

    #[test]
    fn key_overrides_card_id() {
        let card = parse_card("coder", br#"{"id": "someone-else", "name": "x"}"#).unwrap();
        assert_eq!(card.id, "coder");
        assert_eq!(card.tools, vec![]);
        assert!(parse_card("coder", b"not json").is_err());
    }

    #[test]
    fn tool_replaces_same_name() {
        let card = AgentCard::new("a")
            .tool(ToolSpec::new("t").description("old"))
            .tool(ToolSpec::new("t").description("new"));
        assert_eq!(card.tools.len(), 1);
        assert_eq!(card.tools[0].description, "new");
    }
}

//! The agent: a NATS connection under an agent id, its durable delivery
//! consumer on `MESH_DELIVER`, its card in `mesh-agents`, its tool handlers,
//! and the one place events are published to `mesh.ingress.<self>.<step>`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::{Client, ConnectOptions};
use schemas::{AgentId, AttributesReader, Event, EventType, TraceParent, subjects};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::a2a::{A2aHandler, A2aReply, A2aRequest, A2aServer};
use crate::card::{AgentCard, Directory, Skill, ToolSpec};
use crate::error::{BoxError, ConnectError, ConnectErrorKind, PublishError, PublishErrorKind};
use crate::inbox::Inbox;
use crate::metrics::Counters;
use crate::otel::Tracing;
use crate::tools::{ToolCall, ToolError, ToolHandler};
use crate::workflow::{Cause, Workflow};

/// The default for [`AgentBuilder::ack_wait`].
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// The default for [`AgentBuilder::call_timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The default for [`AgentBuilder::max_attempts`].
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The default for [`AgentBuilder::prefetch`].
pub const DEFAULT_PREFETCH: usize = 64;

/// How the agent authenticates to NATS.
#[derive(Debug, Clone)]
enum Credentials {
    None,
    File(PathBuf),
    /// A seed file, or a credentials file (told apart by its content).
    KeyFile(PathBuf),
    NKey(String),
    UserPassword(String, String),
    Token(String),
}

/// Tunables shared by every part of the agent.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: i64,
    pub(crate) nak_delay: Duration,
    pub(crate) call_timeout: Duration,
    pub(crate) max_concurrent_tools: usize,
    pub(crate) shutdown_grace: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) max_backoff: Duration,
    pub(crate) max_concurrent_deliveries: usize,
    pub(crate) prefetch: usize,
    pub(crate) verify_deliveries: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: -1,
            nak_delay: Duration::from_secs(1),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            max_concurrent_tools: 16,
            shutdown_grace: Duration::from_secs(10),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_backoff: Duration::from_secs(60),
            max_concurrent_deliveries: 1,
            prefetch: DEFAULT_PREFETCH,
            verify_deliveries: true,
        }
    }
}

/// Configures and connects an [`Agent`].
///
/// ```no_run
/// use agents_sdk::{Agent, Skill, ToolCall, ToolSpec};
/// use serde_json::json;
/// use std::time::Duration;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let agent = Agent::builder("coder")
///     .description("Reads the repository")
///     .skill(Skill::new("rust", "Rust programming").tag("code"))
///     .tool(ToolSpec::new("repo.read"), |call: ToolCall| async move {
///         let path: String = call.arg("path")?;
///         Ok(json!({ "text": std::fs::read_to_string(path)? }))
///     })
///     .credentials_file("/etc/agentmesh/coder.creds")
///     .ack_wait(Duration::from_secs(60))
///     .connect("nats://127.0.0.1:4222")
///     .await?;
/// # let _ = agent;
/// # Ok(())
/// # }
/// ```
#[must_use = "an AgentBuilder does nothing until `connect` is awaited"]
pub struct AgentBuilder {
    id: String,
    card: AgentCard,
    credentials: Credentials,
    options: Option<ConnectOptions>,
    tools: HashMap<String, Arc<dyn ToolHandler>>,
    a2a: Option<Arc<dyn A2aHandler>>,
    otlp_endpoint: Option<String>,
    settings: Settings,
    register_card: bool,
}

impl AgentBuilder {
    fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        Self {
            card: AgentCard::new(id.clone()),
            id,
            credentials: Credentials::None,
            options: None,
            tools: HashMap::new(),
            a2a: None,
            otlp_endpoint: None,
            settings: Settings::default(),
            register_card: true,
        }
    }

    /// Whether to verify each delivery's decision signature before any
    /// handler sees it (default: yes). A delivery that fails — unsigned,
    /// signed by a key not trusted in `mesh-signers`, or with data,
    /// attributes or `Mesh-*` headers altered since it was signed — is
    /// refused: logged with the reason, counted in
    /// [`AgentMetrics::refused`](crate::AgentMetrics::refused) and
    /// acknowledged. Switch it off only for an agent that trusts its broker
    /// alone (a mesh older than signed decisions).
    pub fn verify_deliveries(mut self, verify: bool) -> Self {
        self.settings.verify_deliveries = verify;
        self
    }

    /// Sets the card's human-readable name (default: the agent id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.card = self.card.name(name);
        self
    }

    /// Sets the card's description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.card = self.card.description(description);
        self
    }

    /// Sets the card's version (default `0.1.0`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.card = self.card.version(version);
        self
    }

    /// Adds a skill to the card.
    pub fn skill(mut self, skill: Skill) -> Self {
        self.card = self.card.skill(skill);
        self
    }

    /// Serves a tool: lists it in the card and answers every `tool.call`
    /// for it with `handler`'s result as a `tool.result` to the caller.
    ///
    /// The handler gets the call and returns any serialisable result, or a
    /// [`ToolError`] (any `std::error::Error` converts with `?`), which the
    /// caller receives as [`CallErrorKind::ToolFailed`](crate::CallErrorKind::ToolFailed).
    pub fn tool<F, Fut, T>(mut self, spec: ToolSpec, handler: F) -> Self
    where
        F: Fn(ToolCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, ToolError>> + Send + 'static,
        T: Serialize + 'static,
    {
        let handler = move |call: ToolCall| {
            let fut = handler(call);
            async move {
                let value = fut.await?;
                serde_json::to_value(value)
                    .map_err(|e| ToolError::new(format!("the result is not JSON: {e}")))
            }
        };
        self.tools.insert(spec.name.clone(), Arc::new(handler));
        self.card = self.card.tool(spec);
        self
    }

    /// Answers A2A requests sent to this agent through the mesh
    /// (`SendMessage`, `GetTask`, `CancelTask` and their 0.3 names; see
    /// `docs/a2a.md`) and lists the A2A-over-NATS interface in the card.
    /// The handler gets each message and returns the reply's parts, which
    /// make a `completed` task; an error makes a `failed` one.
    ///
    /// ```no_run
    /// use agents_sdk::{Agent, A2aReply, A2aRequest};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let agent = Agent::builder("coder")
    ///     .a2a(|request: A2aRequest| async move {
    ///         Ok(A2aReply::text(format!("you said: {}", request.text())))
    ///     })
    ///     .connect("nats://127.0.0.1:4222")
    ///     .await?;
    /// # let _ = agent;
    /// # Ok(())
    /// # }
    /// ```
    pub fn a2a<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(A2aRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<A2aReply, ToolError>> + Send + 'static,
    {
        self.a2a = Some(Arc::new(handler));
        self
    }

    /// Uses `card` as the agent's card (its id becomes the agent id). Tools
    /// registered with [`tool`](Self::tool), before or after, stay listed,
    /// replacing same-named entries of `card`.
    pub fn card(mut self, card: AgentCard) -> Self {
        let served = std::mem::take(&mut self.card.tools);
        self.card = served.into_iter().fold(card, AgentCard::tool);
        self
    }

    /// Exports a span per step to this OTLP/HTTP endpoint (a base URL such
    /// as `http://127.0.0.1:4318`; `/v1/traces` is added). Default: the
    /// environment's `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; none set, no spans. See `docs/sdk.md`.
    pub fn otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Whether to write the card to `mesh-agents` on connect (default: yes).
    pub fn register_card(mut self, register: bool) -> Self {
        self.register_card = register;
        self
    }

    /// Authenticates with a NATS credentials file (JWT and NKey seed).
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials = Credentials::File(path.into());
        self
    }

    /// Authenticates with the key in `path`: an nkey seed file (as
    /// `meshctl agents add <id>` writes to `.agentmesh/auth/agents/<id>.nk`)
    /// or a NATS credentials file (JWT and seed), told apart by content.
    ///
    /// A builder given no credentials uses the file named by the
    /// environment variable `AGENTMESH_NKEY_FILE` ([`NKEY_FILE_ENV`](crate::NKEY_FILE_ENV)),
    /// when that is set.
    pub fn nkey_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials = Credentials::KeyFile(path.into());
        self
    }

    /// Authenticates with an NKey seed.
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.credentials = Credentials::NKey(seed.into());
        self
    }

    /// Authenticates with a user and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Credentials::UserPassword(user.into(), password.into());
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.credentials = Credentials::Token(token.into());
        self
    }

    /// Starts from these async-nats options (TLS, timeouts, callbacks); the
    /// credentials set on this builder are applied on top.
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// How long JetStream waits for an acknowledgement before it delivers a
    /// message again (default 30 s). Tool handlers that run longer keep their
    /// call alive automatically.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.settings.ack_wait = ack_wait;
        self
    }

    /// The broker's own limit on deliveries of one message (`max_deliver`
    /// of the durable; default: none). The SDK gives up on a failing
    /// delivery itself after [`max_attempts`](Self::max_attempts) and
    /// reports it; a broker limit drops the message silently.
    pub fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.settings.max_deliver = max_deliver;
        self
    }

    /// How long a failed delivery waits before its second attempt (default
    /// 1 s); each further attempt waits twice as long as the one before, up
    /// to [`max_backoff`](Self::max_backoff).
    pub fn nak_delay(mut self, delay: Duration) -> Self {
        self.settings.nak_delay = delay;
        self
    }

    /// The longest wait between two attempts of a failed delivery (default
    /// 60 s).
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.settings.max_backoff = max;
        self
    }

    /// How many times a delivery is attempted before the agent gives up on
    /// it (default 5, at least 1): after the last failed attempt it is
    /// terminated and an `io.agentmesh.observation` saying so is published
    /// (see [`Delivery::fail`](crate::Delivery::fail)).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_attempts = attempts.max(1);
        self
    }

    /// How many deliveries [`Agent::serve_with`] handles at once (default
    /// 1: one at a time, in order).
    pub fn max_concurrent_deliveries(mut self, max: usize) -> Self {
        self.settings.max_concurrent_deliveries = max.max(1);
        self
    }

    /// How many deliveries are pulled ahead of the handlers (default 64, at
    /// least 1). Messages pulled ahead are kept alive at the broker until
    /// handled, so they are not delivered twice however long they wait.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.settings.prefetch = prefetch.max(1);
        self
    }

    /// The default timeout of tool calls and requests (default 30 s).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.settings.call_timeout = timeout;
        self
    }

    /// How many tool calls run at once (default 16).
    pub fn max_concurrent_tools(mut self, max: usize) -> Self {
        self.settings.max_concurrent_tools = max.max(1);
        self
    }

    /// How long [`Agent::serve`] waits for running tool calls on shutdown
    /// (default 10 s); calls still running then are delivered again later.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = grace;
        self
    }

    /// Connects to the NATS server(s) at `url` and sets the agent up: one
    /// URL, or the URLs of a cluster's nodes separated by commas, tried in
    /// that order (the connection fails over between them).
    ///
    /// Without credentials set on the builder, the key file named by
    /// `AGENTMESH_NKEY_FILE` is used when that variable is set. A broker
    /// that refuses the credentials is [`ConnectErrorKind::Refused`], whose
    /// message names the key to pass.
    pub async fn connect(mut self, url: impl AsRef<str>) -> Result<Agent, ConnectError> {
        let url = url.as_ref();
        let id = AgentId::new(&self.id)
            .map_err(|_| ConnectErrorKind::InvalidAgentId(self.id.clone()))?;
        if matches!(self.credentials, Credentials::None)
            && let Some(path) =
                std::env::var_os(crate::error::NKEY_FILE_ENV).filter(|p| !p.is_empty())
        {
            self.credentials = Credentials::KeyFile(path.into());
        }
        let mut options = self.options.take().unwrap_or_default();
        let key = match &self.credentials {
            Credentials::File(path) | Credentials::KeyFile(path) => {
                Some(path.display().to_string())
            }
            _ => None,
        };
        options = match &self.credentials {
            Credentials::None => options,
            Credentials::File(path) => credentials_file(options, path).await?,
            Credentials::KeyFile(path) => match read_key_file(path)? {
                KeyFile::Seed(seed) => options.nkey(seed),
                KeyFile::Credentials => credentials_file(options, path).await?,
            },
            Credentials::NKey(seed) => options.nkey(seed.clone()),
            Credentials::UserPassword(user, pass) => {
                options.user_and_password(user.clone(), pass.clone())
            }
            Credentials::Token(token) => options.token(token.clone()),
        };
        let options = options.name(format!("agentmesh-agent-{id}"));
        let client = schemas::servers::connect(options, url).await.map_err(|e| {
            let kind = if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation {
                ConnectErrorKind::Refused {
                    agent: id.to_string(),
                    url: url.to_owned(),
                    key,
                }
            } else {
                ConnectErrorKind::Connect(url.to_owned())
            };
            ConnectError::with_source(kind, e)
        })?;
        self.setup(id, client).await
    }

    /// Sets the agent up on an existing connection (credentials and connect
    /// options on this builder are ignored).
    pub async fn connect_with(self, client: Client) -> Result<Agent, ConnectError> {
        let id = AgentId::new(&self.id)
            .map_err(|_| ConnectErrorKind::InvalidAgentId(self.id.clone()))?;
        self.setup(id, client).await
    }

    async fn setup(self, id: AgentId, client: Client) -> Result<Agent, ConnectError> {
        let js = jetstream::new(client.clone());
        // Which stream holds each of the agent's subjects: stream names only
        // (an agent on a mesh with authorization may not read the streams'
        // information, which lists who exchanged how many messages).
        for (stream, subject) in [
            (
                subjects::STREAM_INGRESS,
                subjects::ingress(id.as_str(), "step"),
            ),
            (
                subjects::STREAM_DELIVER,
                subjects::deliver(id.as_str(), "any"),
            ),
            (subjects::STREAM_DECISION, subjects::decision(id.as_str())),
        ] {
            match js.stream_by_subject(subject).await {
                Ok(name) if name == stream => {}
                Ok(_) => return Err(ConnectErrorKind::MissingStream(stream.to_owned()).into()),
                Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                    return Err(ConnectErrorKind::MissingStream(stream.to_owned()).into());
                }
                Err(e) => return Err(ConnectError::with_source(ConnectErrorKind::Broker, e)),
            }
        }
        let consumer_name = consumer_name(&id);
        let consumer: consumer::PullConsumer = js
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some(consumer_name.clone()),
                    description: Some(format!("deliveries to agent `{id}`")),
                    filter_subject: subjects::deliveries_to(id.as_str()),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.settings.ack_wait,
                    max_deliver: self.settings.max_deliver,
                    max_ack_pending: 1000,
                    ..Default::default()
                },
                subjects::STREAM_DELIVER,
            )
            .await
            .map_err(|e| {
                ConnectError::with_source(ConnectErrorKind::Consumer(consumer_name.clone()), e)
            })?;
        let calls = self.calls_consumer(&js, &id, &consumer_name).await?;
        let directory = Directory::open(&js).await.map_err(|e| match e.kind_ref() {
            crate::error::DirectoryErrorKind::MissingBucket => ConnectError::new(
                ConnectErrorKind::MissingStream(subjects::BUCKET_AGENTS.to_owned()),
            ),
            _ => ConnectError::with_source(ConnectErrorKind::Broker, e),
        })?;
        let mut card = self.card;
        card.id = id.to_string();
        if self.a2a.is_some() {
            card = card.a2a_interface();
        }
        if self.register_card {
            directory
                .register(&card)
                .await
                .map_err(|e| ConnectError::with_source(ConnectErrorKind::Card, e))?;
        }
        let trust = if self.settings.verify_deliveries {
            Some(crate::trust::Trust::open(&js).await)
        } else {
            tracing::warn!(agent = %id, "Delivery signatures are not verified (verify_deliveries(false)).");
            None
        };
        tracing::debug!(agent = %id, consumer = %consumer_name, "Agent connected.");
        let otel = Tracing::start(id.as_str(), self.otlp_endpoint.as_deref());
        let agent = Agent {
            inner: Arc::new(Inner {
                tool_slots: Arc::new(Semaphore::new(self.settings.max_concurrent_tools)),
                id,
                client,
                js,
                consumer,
                calls,
                consumer_name,
                directory,
                card,
                tools: self.tools,
                a2a: self.a2a.map(|handler| Arc::new(A2aServer::new(handler))),
                otel,
                awaited: Mutex::new(Awaited::default()),
                inbox: Inbox::default(),
                tasks: TaskTracker::new(),
                counters: Counters::default(),
                settings: self.settings,
                trust,
            }),
        };
        agent
            .start_receipts()
            .await
            .map_err(|e| ConnectError::with_source(ConnectErrorKind::Broker, e))?;
        Ok(agent)
    }
}

impl AgentBuilder {
    /// The agent's durable of tool calls on `MESH_CALL`, when the mesh has
    /// that stream; `None` (calls come as deliveries, as before) when it has
    /// not, or when the durable cannot be bound (a broker whose grants
    /// predate it).
    async fn calls_consumer(
        &self,
        js: &jetstream::Context,
        id: &AgentId,
        name: &str,
    ) -> Result<Option<consumer::PullConsumer>, ConnectError> {
        match js
            .stream_by_subject(subjects::call(id.as_str(), "any"))
            .await
        {
            Ok(stream) if stream == subjects::STREAM_CALL => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                tracing::debug!(agent = %id, "No MESH_CALL stream; tool calls come as deliveries.");
                return Ok(None);
            }
            Err(e) => return Err(ConnectError::with_source(ConnectErrorKind::Broker, e)),
        }
        let created = js
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    description: Some(format!("tool calls to agent `{id}`")),
                    filter_subject: subjects::calls_to(id.as_str()),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.settings.ack_wait,
                    max_deliver: self.settings.max_deliver,
                    max_ack_pending: 1000,
                    ..Default::default()
                },
                subjects::STREAM_CALL,
            )
            .await;
        match created {
            Ok(calls) => Ok(Some(calls)),
            Err(e) => {
                tracing::warn!(agent = %id, consumer = %name, error = %e, "Cannot bind the tool-call durable on MESH_CALL; tool calls come as deliveries.");
                Ok(None)
            }
        }
    }
}

/// What a key file holds.
enum KeyFile {
    /// An nkey seed (`SU…`).
    Seed(String),
    /// A NATS credentials file (a user JWT and its seed).
    Credentials,
}

/// Reads `path`: a credentials file, or the first `SU…` line as the seed.
fn read_key_file(path: &std::path::Path) -> Result<KeyFile, ConnectError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConnectError::with_source(ConnectErrorKind::Credentials(shown.clone()), e))?;
    if text.contains("BEGIN NATS USER JWT") {
        return Ok(KeyFile::Credentials);
    }
    text.lines()
        .map(str::trim)
        .find(|l| is_user_seed(l))
        .map(|seed| KeyFile::Seed(seed.to_owned()))
        .ok_or_else(|| {
            ConnectError::with_source(
                ConnectErrorKind::Credentials(shown),
                "neither an nkey user seed (a line of 58 base32 characters starting `SU`) nor a NATS credentials file",
            )
        })
}

/// Whether `line` looks like an nkey user seed: `SU` and 56 more base32
/// characters (what `meshctl agents add` writes).
fn is_user_seed(line: &str) -> bool {
    line.len() == 58
        && line.starts_with("SU")
        && line
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

async fn credentials_file(
    options: ConnectOptions,
    path: &std::path::Path,
) -> Result<ConnectOptions, ConnectError> {
    options.credentials_file(path).await.map_err(|e| {
        ConnectError::with_source(ConnectErrorKind::Credentials(path.display().to_string()), e)
    })
}

/// The durable consumer an agent reads its deliveries from: `agent-<id>`.
pub fn consumer_name(id: &AgentId) -> String {
    subjects::agent_consumer(id.as_str())
}

/// Ids of calls this process waits (or waited) for, with the type of the
/// answer, so the delivery stream can drop the durable copy of an answer
/// that a call already consumed. Bounded: the oldest ids are forgotten.
#[derive(Debug, Default)]
pub(crate) struct Awaited {
    /// Call id -> (answer type, answering agent).
    types: HashMap<String, (EventType, String)>,
    order: VecDeque<String>,
}

const AWAITED_CAPACITY: usize = 4096;

impl Awaited {
    pub(crate) fn insert(&mut self, id: String, answer: EventType, from: String) {
        if self.types.insert(id.clone(), (answer, from)).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > AWAITED_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.types.remove(&old);
            }
        }
    }

    pub(crate) fn answers(&self, causation: &str, ty: EventType, from: &str) -> bool {
        self.types
            .get(causation)
            .is_some_and(|(answer, callee)| *answer == ty && callee == from)
    }
}

pub(crate) struct Inner {
    pub(crate) id: AgentId,
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    pub(crate) consumer: consumer::PullConsumer,
    /// The durable of tool calls on `MESH_CALL`, when the mesh has one.
    pub(crate) calls: Option<consumer::PullConsumer>,
    pub(crate) consumer_name: String,
    pub(crate) directory: Directory,
    pub(crate) card: AgentCard,
    pub(crate) tools: HashMap<String, Arc<dyn ToolHandler>>,
    /// The A2A handler and its tasks, when the agent answers A2A.
    pub(crate) a2a: Option<Arc<A2aServer>>,
    /// The exporter of step spans, when one is configured.
    pub(crate) otel: Option<Tracing>,
    pub(crate) awaited: Mutex<Awaited>,
    pub(crate) inbox: Inbox,
    pub(crate) tasks: TaskTracker,
    pub(crate) tool_slots: Arc<Semaphore>,
    pub(crate) counters: Counters,
    pub(crate) settings: Settings,
    /// The trusted signers, when deliveries are verified.
    pub(crate) trust: Option<Arc<crate::trust::Trust>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.inbox.stop();
    }
}

/// A connected agent. Cheap to clone: clones share the connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let agent = agents_sdk::Agent::connect("planner", "nats://127.0.0.1:4222").await?;
/// let workflow = agent.workflow();
/// workflow.prompt("Add a test for the parser").await?;
/// workflow.handoff("coder", "write the test").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.inner.id)
            .field("consumer", &self.inner.consumer_name)
            .field("tools", &self.inner.tools.keys().collect::<HashSet<_>>())
            .finish()
    }
}

/// What JetStream said about a published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event id (a UUIDv7).
    pub id: String,
    /// The event's `traceparent`: the workflow's trace id and this step's span.
    pub trace: TraceParent,
    /// The ingress subject it was published on.
    pub subject: String,
    /// Its sequence in `MESH_INGRESS`.
    pub sequence: u64,
    /// Whether JetStream had already stored an event with this id.
    pub duplicate: bool,
}

impl Agent {
    /// Starts configuring agent `id` (card, tools, credentials, tunables).
    pub fn builder(id: impl Into<String>) -> AgentBuilder {
        AgentBuilder::new(id)
    }

    /// Connects agent `id` to the NATS server at `url` (or the comma-separated
    /// URLs of a cluster's nodes) with defaults.
    pub async fn connect(
        id: impl Into<String>,
        url: impl AsRef<str>,
    ) -> Result<Agent, ConnectError> {
        Self::builder(id).connect(url).await
    }

    /// The agent id.
    pub fn id(&self) -> &AgentId {
        &self.inner.id
    }

    /// The NATS connection.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The card this agent registered (or would have).
    pub fn card(&self) -> &AgentCard {
        &self.inner.card
    }

    /// The agent directory (`mesh-agents`).
    pub fn directory(&self) -> &Directory {
        &self.inner.directory
    }

    /// The name of the agent's durable delivery consumer (`agent-<id>`).
    pub fn consumer_name(&self) -> &str {
        &self.inner.consumer_name
    }

    /// A new workflow: mints a trace whose first step is its root.
    pub fn workflow(&self) -> Workflow {
        Workflow::new(self.clone(), TraceParent::mint(), None, None)
    }

    /// Continues an existing trace; the next step follows `after` (an event
    /// id) when given, else it is a root step.
    ///
    /// ```no_run
    /// # async fn demo(agent: agents_sdk::Agent) -> Result<(), Box<dyn std::error::Error>> {
    /// // A trace started elsewhere, e.g. by an HTTP front end.
    /// let trace: agents_sdk::TraceParent =
    ///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
    /// let wf = agent.continue_trace(trace, None);
    /// wf.prompt("from the web form").await?;
    /// assert_eq!(wf.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// # Ok(())
    /// # }
    /// ```
    pub fn continue_trace(&self, trace: TraceParent, after: Option<String>) -> Workflow {
        Workflow::new(self.clone(), trace, after.map(Cause::id), Some(trace))
    }

    /// Continues `trace` after event `id` of `agent` (a delivery or call
    /// this agent received): the next step names both as its cause.
    pub(crate) fn continue_after(&self, trace: TraceParent, id: &str, agent: &str) -> Workflow {
        Workflow::new(self.clone(), trace, Some(Cause::of(id, agent)), Some(trace))
    }

    /// Flushes what is buffered and waits for running tool calls (up to the
    /// shutdown grace).
    pub async fn close(&self) -> Result<(), BoxError> {
        self.inner.tasks.close();
        let _ =
            tokio::time::timeout(self.inner.settings.shutdown_grace, self.inner.tasks.wait()).await;
        self.inner.tasks.reopen();
        if let Some(otel) = &self.inner.otel {
            otel.flush().await;
        }
        self.inner.client.flush().await?;
        Ok(())
    }

    /// Publishes `event` on `mesh.ingress.<self>.<step>` through JetStream
    /// and waits for the stream's acknowledgement.
    pub(crate) async fn publish_event(
        &self,
        step: &str,
        event: &Event,
        trace: TraceParent,
        parent: Option<TraceParent>,
    ) -> Result<Published, PublishError> {
        let subject = subjects::ingress(self.inner.id.as_str(), step);
        // The step's span, when spans are exported: ends once JetStream acked.
        let _span = self.inner.otel.as_ref().and_then(|otel| {
            let event_type = event.ty().parse::<EventType>().ok()?;
            Some(otel.step(
                self.inner.id.as_str(),
                &subject,
                event,
                event_type,
                trace,
                parent,
            ))
        });
        let (mut headers, payload) = schemas::encode_binary(event);
        // Lets JetStream drop a re-sent copy of the same event.
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            subjects::event_key(self.inner.id.as_str(), event.id()),
        );
        let ack = self
            .inner
            .js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| PublishError::with_source(PublishErrorKind::Publish(subject.clone()), e))?
            .await
            .map_err(|e| PublishError::with_source(PublishErrorKind::Ack(subject.clone()), e))?;
        tracing::debug!(%subject, id = event.id(), r#type = event.ty(), "Event published.");
        Ok(Published {
            id: event.id().to_owned(),
            trace,
            subject,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    pub(crate) fn tool_handler(&self, tool: &str) -> Option<Arc<dyn ToolHandler>> {
        self.inner.tools.get(tool).cloned()
    }

    pub(crate) fn remember_call(&self, id: &str, answer: EventType, from: &str) {
        if let Ok(mut awaited) = self.inner.awaited.lock() {
            awaited.insert(id.to_owned(), answer, from.to_owned());
        }
    }

    pub(crate) fn was_awaited(&self, causation: &str, answer: EventType, from: &str) -> bool {
        self.inner
            .awaited
            .lock()
            .map(|a| a.answers(causation, answer, from))
            .unwrap_or(false)
    }
}

/// The JSON value of `data`, or why it could not be made.
pub(crate) fn to_json(data: impl Serialize) -> Result<Value, String> {
    serde_json::to_value(data).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_card_keeps_the_served_tools() {
        let builder = Agent::builder("coder")
            .tool(
                ToolSpec::new("code.search").description("served"),
                |_call: ToolCall| async move { Ok(1) },
            )
            .card(
                AgentCard::new("ignored")
                    .description("from the card")
                    .tool(ToolSpec::new("code.search").description("claimed"))
                    .tool(ToolSpec::new("docs.read")),
            );
        assert_eq!(builder.card.description, "from the card");
        let tools: Vec<_> = builder
            .card
            .tools
            .iter()
            .map(|t| (t.name.as_str(), t.description.as_str()))
            .collect();
        assert_eq!(tools, [("docs.read", ""), ("code.search", "served")]);
        assert!(builder.tools.contains_key("code.search"));
    }

    #[test]
    fn a_key_file_is_a_seed_or_a_creds_file() {
        let dir = std::env::temp_dir().join(format!("agents-sdk-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seed = format!("SU{}", "A".repeat(56));
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let seed_file = file("planner.nk", &format!("{seed}\n"));
        assert!(matches!(read_key_file(&seed_file), Ok(KeyFile::Seed(s)) if s == seed));
        let creds = file(
            "planner.creds",
            "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n",
        );
        assert!(matches!(read_key_file(&creds), Ok(KeyFile::Credentials)));
        for (name, text) in [
            ("short.nk", "SUAM0000\n"),
            ("empty.nk", ""),
            ("conf.nk", "port: 4222\n"),
        ] {
            let path = file(name, text);
            let err = read_key_file(&path).err().unwrap();
            assert_eq!(
                err.kind(),
                ConnectErrorKind::Credentials(path.display().to_string()),
                "{name}"
            );
            assert!(
                err.to_string().contains("neither an nkey user seed"),
                "{err}"
            );
        }
        let missing = dir.join("missing.nk");
        assert!(read_key_file(&missing).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn awaited_is_bounded_and_typed() {
        let mut a = Awaited::default();
        a.insert("c1".into(), EventType::ToolResult, "coder".into());
        assert!(a.answers("c1", EventType::ToolResult, "coder"));
        assert!(!a.answers("c1", EventType::ToolResult, "mallory"));
        assert!(!a.answers("c1", EventType::Message, "coder"));
        for i in 0..AWAITED_CAPACITY {
            a.insert(format!("x{i}"), EventType::Message, "reviewer".into());
        }
        assert!(!a.answers("c1", EventType::ToolResult, "coder"));
        assert!(a.answers(
            &format!("x{}", AWAITED_CAPACITY - 1),
            EventType::Message,
            "reviewer"
        ));
        assert_eq!(a.order.len(), AWAITED_CAPACITY);
    }
}

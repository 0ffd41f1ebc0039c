//! The agent as its author sees it: the builder that connects it (NATS
//! credentials, its durable delivery consumer on `MESH_DELIVER`, its card
//! in `mesh-agents`, its tool and A2A handlers), and every public method of
//! [`Agent`], over the modules below (`delivery`, `call`, `workflow`) and
//! the agent's shared state (`inner`).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, consumer};
use async_nats::{Client, ConnectOptions};
use schemas::{AgentId, TraceParent, subjects};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::a2a::{A2aHandler, A2aReply, A2aRequest, A2aServer};
use crate::call::DecisionWait;
use crate::card::{AgentCard, Directory, Skill, ToolSpec};
use crate::delivery::{self, Deliveries, Delivery};
use crate::error::{
    BoxError, ConnectError, ConnectErrorKind, DeliveryError, DeliveryErrorKind, DirectoryErrorKind,
    NKEY_FILE_ENV, ToolError,
};
use crate::inbox::Inbox;
use crate::inner::{A2aService, Agent, AgentInner, Awaited, Settings, ToolHandler};
use crate::metrics::{AgentMetrics, Counters, Pending};
use crate::otel::Tracing;
use crate::tools::ToolCall;
use crate::trust::Trust;
use crate::workflow::{Cause, Workflow};

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
            && let Some(path) = std::env::var_os(NKEY_FILE_ENV).filter(|p| !p.is_empty())
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
            DirectoryErrorKind::MissingBucket => ConnectError::new(
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
            Some(Trust::open(&js).await)
        } else {
            tracing::warn!(agent = %id, "Delivery signatures are not verified (verify_deliveries(false)).");
            None
        };
        tracing::debug!(agent = %id, consumer = %consumer_name, "Agent connected.");
        let otel = Tracing::start(id.as_str(), self.otlp_endpoint.as_deref());
        let inbox = Inbox::default();
        inbox
            .start_receipts(&id, &js, &client)
            .await
            .map_err(|e| ConnectError::with_source(ConnectErrorKind::Broker, e))?;
        let a2a = self.a2a.map(|handler| {
            let server: Arc<dyn A2aService> = Arc::new(A2aServer::new(handler));
            server
        });
        let agent = Agent {
            inner: Arc::new(AgentInner {
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
                a2a,
                otel,
                awaited: Mutex::new(Awaited::default()),
                inbox,
                tasks: TaskTracker::new(),
                counters: Counters::default(),
                settings: self.settings,
                trust,
            }),
        };
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

    /// A snapshot of this agent's counters: its queue in this process,
    /// running handlers and tools, retries and give-ups.
    pub fn metrics(&self) -> AgentMetrics {
        let c = &self.inner.counters;
        AgentMetrics {
            buffered_deliveries: c.buffered_deliveries.load(Ordering::Relaxed),
            buffered_calls: c.buffered_calls.load(Ordering::Relaxed),
            handlers_running: c.handlers_running.load(Ordering::Relaxed),
            tools_running: c.tools_running.load(Ordering::Relaxed),
            handled: c.handled.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            gave_up: c.gave_up.load(Ordering::Relaxed),
            invalid: c.invalid.load(Ordering::Relaxed),
            tool_calls: c.tool_calls.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }

    /// What waits for this agent at the broker (one JetStream request per
    /// durable).
    pub async fn pending(&self) -> Result<Pending, DeliveryError> {
        async fn counts(
            consumer: &PullConsumer,
            name: &str,
        ) -> Result<(u64, usize), DeliveryError> {
            let mut consumer = consumer.clone();
            let info = consumer.info().await.map_err(|e| {
                DeliveryError::with_source(DeliveryErrorKind::Pull(name.to_owned()), e)
            })?;
            Ok((info.num_pending, info.num_ack_pending))
        }
        let name = &self.inner.consumer_name;
        let (deliveries, deliveries_unacked) = counts(&self.inner.consumer, name).await?;
        let (calls, calls_unacked) = match &self.inner.calls {
            Some(calls) => counts(calls, &format!("{}/{name}", subjects::STREAM_CALL)).await?,
            None => (0, 0),
        };
        Ok(Pending {
            deliveries,
            deliveries_unacked,
            calls,
            calls_unacked,
        })
    }

    /// Waits for the decision receipt of event `event_id`, which this agent
    /// published. Works whether the receipt came before or after the wait
    /// (the agent keeps its most recent 4096 receipts), and whether the
    /// agent was connected when it was written: receipts are read from the
    /// agent's durable `receipts-<id>` on `MESH_DECISION`.
    ///
    /// ```no_run
    /// # async fn demo(agent: agents_sdk::Agent) -> Result<(), Box<dyn std::error::Error>> {
    /// let published = agent.workflow().handoff("coder", "write tests").await?;
    /// let receipt = agent.await_decision(&published.id).await?;
    /// println!("{}: {:?}", receipt.decision, receipt.reasons);
    /// # Ok(())
    /// # }
    /// ```
    pub fn await_decision(&self, event_id: impl Into<String>) -> DecisionWait {
        DecisionWait::new(self.clone(), event_id.into())
    }

    /// The events the mesh delivers to this agent, as a stream.
    ///
    /// Deliveries are pulled ahead in batches (up to the agent's
    /// [`prefetch`](crate::AgentBuilder::prefetch)); those waiting in this
    /// process are kept alive at the broker, so none is delivered again for
    /// having waited. `tool.call`s for tools registered on the builder are
    /// answered by the SDK while the stream exists (concurrently, up to
    /// `max_concurrent_tools`), read from the agent's own durable on
    /// `MESH_CALL` where the mesh has one, so they never wait behind other
    /// deliveries; answers to this process's own calls and requests are
    /// consumed by those. Everything else is yielded, to be acknowledged by
    /// the caller within the ack wait (or kept alive with
    /// [`Delivery::in_progress`]). Errors are transient: the stream goes on.
    pub async fn deliveries(&self) -> Result<Deliveries, DeliveryError> {
        delivery::deliveries(self).await
    }

    /// Serves the registered tools until `shutdown` completes, then waits for
    /// running calls (up to the shutdown grace).
    ///
    /// Tool calls for tools this agent does not serve are answered with an
    /// error; any other delivery is logged and acknowledged. Use
    /// [`serve_with`](Agent::serve_with) to handle those.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use agents_sdk::{Agent, ToolCall, ToolSpec};
    ///
    /// let agent = Agent::builder("clock")
    ///     .tool(ToolSpec::new("clock.now"), |_call: ToolCall| async move {
    ///         Ok(std::time::SystemTime::now()
    ///             .duration_since(std::time::UNIX_EPOCH)?
    ///             .as_secs())
    ///     })
    ///     .connect("nats://127.0.0.1:4222")
    ///     .await?;
    /// agent.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), DeliveryError> {
        delivery::serve(self, shutdown).await
    }

    /// Handles every delivery with `handler` until `shutdown` completes:
    /// acknowledged when it returns `Ok` (unless it settled the delivery
    /// itself); when it returns `Err` (or panics), attempted again after a
    /// backoff, and after the agent's
    /// [`max_attempts`](crate::AgentBuilder::max_attempts) given up on and
    /// reported (see [`Delivery::fail`]).
    ///
    /// Up to [`max_concurrent_deliveries`](crate::AgentBuilder::max_concurrent_deliveries)
    /// handlers run at once (default 1: one at a time, in order), with
    /// deliveries pulled ahead in batches. While a handler runs, its
    /// delivery's ack wait is extended, so a slow handler (a model call) is
    /// not raced by a redelivery, and registered tools go on being served.
    /// On shutdown, running handlers get the shutdown grace to finish; what
    /// is left is delivered again later.
    ///
    /// ```no_run
    /// # async fn demo(agent: agents_sdk::Agent) -> Result<(), Box<dyn std::error::Error>> {
    /// use agents_sdk::{Delivery, EventType};
    ///
    /// agent
    ///     .serve_with(async { let _ = tokio::signal::ctrl_c().await; }, |d: Delivery| async move {
    ///         if d.event_type() == EventType::Message {
    ///             d.reply(serde_json::json!({"seen": d.id()})).await?;
    ///         }
    ///         Ok::<_, agents_sdk::PublishError>(())
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn serve_with<F, Fut, E>(
        &self,
        shutdown: impl Future<Output = ()> + Send,
        handler: F,
    ) -> Result<(), DeliveryError>
    where
        F: FnMut(Delivery) -> Fut + Send,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::fmt::Display,
    {
        delivery::serve_with(self, shutdown, handler).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inner::AWAITED_CAPACITY;
    use schemas::EventType;

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

//! The agent's shared inner state: [`Agent`] (the handle every part holds)
//! around [`AgentInner`] (connection, consumers, settings, counters, the
//! inbox, the registered handlers), the one place events are published to
//! `mesh.ingress.<agent>.<step>` ([`AgentInner::publish_event`]), and the
//! type-erased handlers the agent holds ([`ToolHandler`], [`A2aService`]).
//!
//! The modules of this crate depend downward only: `agent` (the public
//! [`Agent`] methods and the builder) on `delivery`, `a2a`, `tools`, `call`
//! and `workflow`, which work on this module's state; this one on `inbox`,
//! `received`, `card`, `metrics`, `otel`, `trust` and `error`. The test
//! `layering::modules_depend_downward_only` keeps it so.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, consumer};
use schemas::{AgentId, AttributesReader, Event, EventType, TraceParent, subjects};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::card::{AgentCard, Directory};
use crate::error::{BoxError, PublishError, PublishErrorKind, ToolError};
use crate::inbox::{Inbox, Waiting};
use crate::metrics::Counters;
use crate::otel::Tracing;
use crate::received::Received;
use crate::trust::Trust;

/// A boxed, sendable future: what the builders of this crate resolve to.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The default for [`AgentBuilder::ack_wait`](crate::AgentBuilder::ack_wait).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// The default for [`AgentBuilder::call_timeout`](crate::AgentBuilder::call_timeout).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The default for [`AgentBuilder::max_attempts`](crate::AgentBuilder::max_attempts).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The default for [`AgentBuilder::prefetch`](crate::AgentBuilder::prefetch).
pub const DEFAULT_PREFETCH: usize = 64;

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

/// Ids of calls this process waits (or waited) for, with the type of the
/// answer, so the delivery stream can drop the durable copy of an answer
/// that a call already consumed. Bounded: the oldest ids are forgotten.
#[derive(Debug, Default)]
pub(crate) struct Awaited {
    /// Call id -> (answer type, answering agent).
    types: HashMap<String, (EventType, String)>,
    pub(crate) order: VecDeque<String>,
}

pub(crate) const AWAITED_CAPACITY: usize = 4096;

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

/// A registered tool handler, type-erased: it is given the serving agent,
/// the call and the tool's arguments (`tools` implements it for the
/// functions of a `ToolCall` that the builder takes).
pub(crate) trait ToolHandler: Send + Sync + 'static {
    fn call(
        &self,
        agent: Agent,
        received: Received,
        tool: String,
        arguments: Value,
    ) -> BoxFuture<Result<Value, ToolError>>;
}

/// The A2A side of an agent, type-erased (`a2a::A2aServer`): answers one
/// A2A request that reached the agent, publishing the response.
pub(crate) trait A2aService: Send + Sync + 'static {
    fn answer(
        self: Arc<Self>,
        agent: Agent,
        received: Received,
    ) -> BoxFuture<Result<(), PublishError>>;
}

/// Everything an agent holds, shared by its clones and by what it hands
/// out (workflows, deliveries, tool calls): the modules below `agent` work
/// on this, never on the public methods of [`Agent`].
pub(crate) struct AgentInner {
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
    pub(crate) a2a: Option<Arc<dyn A2aService>>,
    /// The exporter of step spans, when one is configured.
    pub(crate) otel: Option<Tracing>,
    pub(crate) awaited: Mutex<Awaited>,
    pub(crate) inbox: Inbox,
    pub(crate) tasks: TaskTracker,
    pub(crate) tool_slots: Arc<Semaphore>,
    pub(crate) counters: Counters,
    pub(crate) settings: Settings,
    /// The trusted signers, when deliveries are verified.
    pub(crate) trust: Option<Arc<Trust>>,
}

impl Drop for AgentInner {
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
    pub(crate) inner: Arc<AgentInner>,
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

impl AgentInner {
    /// Publishes `event` on `mesh.ingress.<agent>.<step>` through JetStream
    /// and waits for the stream's acknowledgement.
    pub(crate) async fn publish_event(
        &self,
        step: &str,
        event: &Event,
        trace: TraceParent,
        parent: Option<TraceParent>,
    ) -> Result<Published, PublishError> {
        let subject = subjects::ingress(self.id.as_str(), step);
        // The step's span, when spans are exported: ends once JetStream acked.
        let _span = self.otel.as_ref().and_then(|otel| {
            let event_type = event.ty().parse::<EventType>().ok()?;
            Some(otel.step(self.id.as_str(), &subject, event, event_type, trace, parent))
        });
        let (mut headers, payload) = schemas::encode_binary(event);
        // Lets JetStream drop a re-sent copy of the same event.
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            subjects::event_key(self.id.as_str(), event.id()),
        );
        let ack = self
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
        self.tools.get(tool).cloned()
    }

    pub(crate) fn remember_call(&self, id: &str, answer: EventType, from: &str) {
        if let Ok(mut awaited) = self.awaited.lock() {
            awaited.insert(id.to_owned(), answer, from.to_owned());
        }
    }

    pub(crate) fn was_awaited(&self, causation: &str, answer: EventType, from: &str) -> bool {
        self.awaited
            .lock()
            .map(|a| a.answers(causation, answer, from))
            .unwrap_or(false)
    }

    /// Registers a wait for event `id`'s receipt (and, with `answers`, for
    /// the deliveries answering it) with the agent's inbox.
    pub(crate) async fn wait_for(&self, id: &str, answers: bool) -> Result<Waiting, BoxError> {
        self.inbox
            .wait_for(&self.client, &self.id, self.trust.clone(), id, answers)
            .await
    }
}

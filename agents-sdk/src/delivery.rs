//! Deliveries: the events the mesh routed to this agent, read from its own
//! durable consumer (`agent-<id>` on `MESH_DELIVER`, filtered on
//! `mesh.deliver.<id>.>`), decoded and validated with `schemas`.
//!
//! A delivery is acknowledged only once it was handled; one that is not
//! (a failed handler, a crash) is delivered again. A message that is not a
//! valid mesh event can never succeed, so it is terminated once, not retried.
//! `tool.call`s for registered tools are answered by the SDK, and answers to
//! this process's own calls are consumed by those calls.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, Stream, StreamExt};
use schemas::{AgentId, AttributesReader, Event, EventType, Invalid, MeshEvent, TraceParent};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::agent::{Agent, Published};
use crate::error::{DeliveryError, DeliveryErrorKind, PublishError};
use crate::payload;
use crate::tools::{ToolCall, ToolError, ToolHandler};
use crate::workflow::{Step, Workflow};

/// A mesh event received by this agent: decoded, validated, typed.
#[derive(Debug, Clone)]
pub struct Received {
    event: MeshEvent,
}

impl Received {
    /// Decodes a message from `mesh.deliver.<target>.<source>`.
    pub fn from_delivery(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<Self, Invalid> {
        let source = subject
            .strip_prefix("mesh.deliver.")
            .and_then(|rest| rest.split('.').nth(1))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Invalid::Subject(subject.to_owned()))?;
        let size = schemas::message_size(headers, payload);
        let (event, mode) = schemas::decode(headers, payload)?;
        Ok(Self {
            event: MeshEvent::validate(source, event, mode, size)?,
        })
    }

    /// The event id.
    pub fn id(&self) -> &str {
        self.event.id()
    }

    /// The catalogue type.
    pub fn event_type(&self) -> EventType {
        self.event.event_type
    }

    /// The agent that sent it (its `source`).
    pub fn sender(&self) -> &AgentId {
        &self.event.agent
    }

    /// The `target` (this agent, for a delivery).
    pub fn target(&self) -> Option<&AgentId> {
        self.event.target.as_ref()
    }

    /// The event's trace (derived from its id when it had no `traceparent`,
    /// as the policy worker derives it).
    pub fn trace(&self) -> TraceParent {
        self.event.trace
    }

    /// The trace id, 32 hex characters.
    pub fn trace_id(&self) -> String {
        self.event.trace.trace_id_hex()
    }

    /// The `causationid`: the event this one answers or follows.
    pub fn causation_id(&self) -> Option<&str> {
        self.event.causation_id.as_deref()
    }

    /// The CloudEvents `subject` (the tool of a tool call or result).
    pub fn subject(&self) -> Option<&str> {
        self.event.event.subject()
    }

    /// The CloudEvent.
    pub fn event(&self) -> &Event {
        &self.event.event
    }

    /// The validated mesh event.
    pub fn mesh_event(&self) -> &MeshEvent {
        &self.event
    }

    /// The data, as bytes.
    pub fn data(&self) -> Vec<u8> {
        self.event.data_bytes()
    }

    /// The data parsed as JSON into `T`, e.g. a [`payload`](crate::payload)
    /// type: `received.json::<payload::TaskHandoff>()`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data())
    }
}

/// One delivery: a [`Received`] event and its JetStream acknowledgement.
///
/// Acknowledge it once handled ([`ack`](Delivery::ack)); if it is dropped
/// without, JetStream delivers it again after the agent's ack wait.
///
/// ```no_run
/// # async fn demo(agent: agents_sdk::Agent) -> Result<(), Box<dyn std::error::Error>> {
/// use agents_sdk::{EventType, payload};
/// use futures::StreamExt;
///
/// let mut deliveries = agent.deliveries().await?;
/// while let Some(delivery) = deliveries.next().await {
///     let delivery = delivery?;
///     match delivery.event_type() {
///         EventType::TaskHandoff => {
///             let handoff: payload::TaskHandoff = delivery.json()?;
///             let wf = delivery.workflow(); // same trace, follows the handoff
///             wf.reasoning(format!("working on {}", handoff.task)).await?;
///             wf.output("done").await?;
///         }
///         EventType::Message => {
///             delivery.reply(serde_json::json!({"pong": true})).await?;
///         }
///         _ => {}
///     }
///     delivery.ack().await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Delivery {
    agent: Agent,
    message: jetstream::Message,
    received: Received,
    acked: Arc<AtomicBool>,
}

impl Deref for Delivery {
    type Target = Received;

    fn deref(&self) -> &Received {
        &self.received
    }
}

impl Delivery {
    /// The received event.
    pub fn received(&self) -> &Received {
        &self.received
    }

    /// The raw JetStream message.
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }

    /// How many times this event has been delivered (1 the first time).
    pub fn delivery_count(&self) -> u64 {
        self.message
            .info()
            .map(|i| u64::try_from(i.delivered).unwrap_or(0))
            .unwrap_or(0)
    }

    async fn ack_with(&self, kind: AckKind) -> Result<(), DeliveryError> {
        self.message.ack_with(kind).await.map_err(|e| {
            DeliveryError::with_source(DeliveryErrorKind::Ack(self.received.id().to_owned()), e)
        })?;
        if !matches!(kind, AckKind::Progress) {
            self.acked.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Acknowledges it: handled, never to be delivered again.
    pub async fn ack(&self) -> Result<(), DeliveryError> {
        self.ack_with(AckKind::Ack).await
    }

    /// Refuses it for now: delivered again after `delay` (or at once).
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), DeliveryError> {
        self.ack_with(AckKind::Nak(delay)).await
    }

    /// Says it is still being worked on: restarts the ack wait.
    pub async fn in_progress(&self) -> Result<(), DeliveryError> {
        self.ack_with(AckKind::Progress).await
    }

    /// Gives up on it for good: never delivered again, not handled.
    pub async fn term(&self) -> Result<(), DeliveryError> {
        self.ack_with(AckKind::Term).await
    }

    /// Whether it was acknowledged, refused or terminated already.
    pub fn is_settled(&self) -> bool {
        self.acked.load(Ordering::SeqCst)
    }

    /// The sender's workflow, continued by this agent: steps published on it
    /// share the delivery's trace, and the first follows the delivery.
    pub fn workflow(&self) -> Workflow {
        self.agent.continue_after(
            self.received.trace(),
            self.received.id(),
            self.received.sender().as_str(),
        )
    }

    /// Answers the sender: an `io.agentmesh.message` to it, in the same
    /// trace, whose `causationid` is this delivery's id (what
    /// [`Workflow::request`] waits for).
    pub fn reply(&self, body: impl Serialize) -> Step {
        self.workflow()
            .message(self.received.sender().to_string(), body)
    }

    /// Answers a `tool.call` by hand with a `tool.result` to the caller.
    /// Registered tools are answered by the SDK; this is for the others.
    pub async fn answer_tool(
        &self,
        result: Result<Value, ToolError>,
    ) -> Result<Published, PublishError> {
        answer_tool(&self.agent, &self.received, result).await
    }
}

/// Publishes the `tool.result` for `call`: to the caller, same trace,
/// `causationid` = the call's id, `subject` = the tool.
async fn answer_tool(
    agent: &Agent,
    call: &Received,
    result: Result<Value, ToolError>,
) -> Result<Published, PublishError> {
    let tool = call.subject().unwrap_or_default().to_owned();
    let data = match result {
        Ok(value) => payload::ToolResult {
            tool: tool.clone(),
            ok: true,
            result: Some(value),
            error: None,
        },
        Err(e) => payload::ToolResult {
            tool: tool.clone(),
            ok: false,
            result: None,
            error: Some(e.message().to_owned()),
        },
    };
    agent
        .continue_after(call.trace(), call.id(), call.sender().as_str())
        .step(EventType::ToolResult)
        .target(call.sender().to_string())
        .subject(tool)
        .data(data)
        .await
}

/// The arguments of a tool call: `arguments` of the SDK's shape, or the whole
/// data for callers that send the arguments bare.
fn tool_arguments(call: &Received) -> Value {
    match call.json::<Value>() {
        Ok(Value::Object(mut map)) if map.contains_key("arguments") => {
            map.remove("arguments").unwrap_or(Value::Null)
        }
        Ok(other) => other,
        Err(_) => Value::Null,
    }
}

/// Ticks every half ack wait: when to tell JetStream a delivery is still
/// being worked on.
fn keepalive_timer(ack_wait: Duration) -> tokio::time::Interval {
    tokio::time::interval((ack_wait / 2).max(Duration::from_millis(100)))
}

/// Restarts `message`'s ack wait.
async fn progress(message: &jetstream::Message) {
    if let Err(e) = message.ack_with(AckKind::Progress).await {
        tracing::debug!(error = %e, "Could not extend the ack wait of a delivery being worked on.");
    }
}

/// Runs `work`, keeping `message` from being delivered again meanwhile.
async fn with_keepalive<T>(
    message: &jetstream::Message,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut keepalive = keepalive_timer(ack_wait);
    // The first tick is immediate; the delivery was just received.
    keepalive.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = keepalive.tick() => progress(message).await,
        }
    }
}

/// How long one pull for the next delivery waits at the server.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// How long the delivery stream waits after a failed pull.
const PULL_RETRY: Duration = Duration::from_secs(1);

/// The stream of [`Agent::deliveries`].
pub struct Deliveries {
    inner: Pin<Box<dyn Stream<Item = Result<Delivery, DeliveryError>> + Send>>,
}

impl Stream for Deliveries {
    type Item = Result<Delivery, DeliveryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// What the delivery stream does with one message.
enum Routed {
    /// Give it to the caller.
    Yield(Box<Delivery>),
    /// Handled inside the SDK.
    Handled,
}

impl Agent {
    /// The events the mesh delivers to this agent, as a stream.
    ///
    /// `tool.call`s for tools registered on the builder are answered by the
    /// SDK while the stream is polled (concurrently, up to
    /// `max_concurrent_tools`); answers to this process's own calls and
    /// requests are consumed by those. Everything else is yielded, to be
    /// acknowledged by the caller within the ack wait (or kept alive with
    /// [`Delivery::in_progress`]). Errors are transient: the stream goes on.
    pub async fn deliveries(&self) -> Result<Deliveries, DeliveryError> {
        // One message is pulled only when the previous one has been routed:
        // a message buffered behind a slow handler would sit out its ack
        // wait and be delivered again, so nothing is fetched ahead.
        let stream = futures::stream::unfold(
            (self.clone(), None::<Batch>, false),
            |(agent, mut batch, mut failing)| async move {
                loop {
                    if failing {
                        // The broker is away: do not spin.
                        tokio::time::sleep(PULL_RETRY).await;
                        failing = false;
                    }
                    let pending = match batch.as_mut() {
                        Some(pending) => pending,
                        None => match agent
                            .inner
                            .consumer
                            .batch()
                            .max_messages(1)
                            .expires(PULL_EXPIRES)
                            .messages()
                            .await
                        {
                            Ok(pending) => batch.insert(pending),
                            Err(e) => {
                                let err = DeliveryError::with_source(
                                    DeliveryErrorKind::Pull(agent.inner.consumer_name.clone()),
                                    e,
                                );
                                return Some((Err(err), (agent, None, true)));
                            }
                        },
                    };
                    let message = match pending.next().await {
                        // The pull expired empty: ask again.
                        None => {
                            batch = None;
                            continue;
                        }
                        Some(Err(e)) => {
                            let err = DeliveryError::with_source(
                                DeliveryErrorKind::Pull(agent.inner.consumer_name.clone()),
                                e,
                            );
                            return Some((Err(err), (agent, None, true)));
                        }
                        Some(Ok(message)) => message,
                    };
                    batch = None;
                    if let Routed::Yield(delivery) = agent.route(message).await {
                        return Some((Ok(*delivery), (agent, None, false)));
                    }
                }
            },
        );
        Ok(Deliveries {
            inner: Box::pin(stream),
        })
    }

    async fn route(&self, message: jetstream::Message) -> Routed {
        let received = match Received::from_delivery(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
        ) {
            Ok(received) => received,
            Err(e) => {
                // It can never succeed: terminate it once rather than loop.
                tracing::warn!(subject = %message.subject, error = %e, "Terminating a delivery that is not a valid mesh event.");
                if let Err(e) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "Could not terminate the invalid delivery.");
                }
                return Routed::Handled;
            }
        };
        if let Some(causation) = received.causation_id()
            && self.was_awaited(causation, received.event_type(), received.sender().as_str())
        {
            tracing::debug!(id = received.id(), %causation, "Answer already consumed by its call; acknowledging.");
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "Could not acknowledge a consumed answer.");
            }
            return Routed::Handled;
        }
        if received.event_type() == EventType::ToolCall
            && let Some(handler) = received.subject().and_then(|tool| self.tool_handler(tool))
        {
            self.spawn_tool(message, received, handler).await;
            return Routed::Handled;
        }
        Routed::Yield(Box::new(Delivery {
            agent: self.clone(),
            message,
            received,
            acked: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Runs a tool handler in its own task and answers the call: acked once
    /// the result is published, refused (delivered again) if it cannot be.
    async fn spawn_tool(
        &self,
        message: jetstream::Message,
        received: Received,
        handler: Arc<dyn ToolHandler>,
    ) {
        // Waiting for a slot holds back the stream: no more pulls while full.
        let Ok(permit) = self.inner.tool_slots.clone().acquire_owned().await else {
            return;
        };
        let agent = self.clone();
        self.inner.tasks.spawn(async move {
            let _permit = permit;
            let tool = received.subject().unwrap_or_default().to_owned();
            let call = ToolCall {
                agent: agent.clone(),
                arguments: tool_arguments(&received),
                received: received.clone(),
                tool: tool.clone(),
            };
            let run = std::panic::AssertUnwindSafe(handler.call(call)).catch_unwind();
            let result = with_keepalive(&message, agent.inner.settings.ack_wait, run).await;
            let result = result.unwrap_or_else(|_| Err(ToolError::new(format!("tool `{tool}` panicked"))));
            if let Err(e) = &result {
                tracing::debug!(%tool, caller = %received.sender(), error = %e, "Tool failed.");
            }
            match answer_tool(&agent, &received, result).await {
                Ok(published) => {
                    tracing::debug!(%tool, call = received.id(), result = %published.id, "Tool call answered.");
                    if let Err(e) = message.ack().await {
                        tracing::warn!(error = %e, "Could not acknowledge an answered tool call; it will be answered again.");
                    }
                }
                Err(e) => {
                    tracing::warn!(%tool, call = received.id(), error = %e, "Could not publish the tool result; the call will be delivered again.");
                    let _ = message.ack_with(AckKind::Nak(Some(agent.inner.settings.nak_delay))).await;
                }
            }
        });
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
        self.serve_with(shutdown, |delivery: Delivery| async move {
            if delivery.event_type() == EventType::ToolCall {
                let tool = delivery.subject().unwrap_or_default().to_owned();
                let refusal = ToolError::new(format!("agent `{}` does not serve tool `{tool}`", delivery.agent.id()));
                delivery.answer_tool(Err(refusal)).await.map(|_| ())
            } else {
                tracing::info!(id = delivery.id(), r#type = %delivery.event_type(), from = %delivery.sender(), "No handler for this delivery; acknowledging it.");
                Ok(())
            }
        })
        .await
    }

    /// Handles every delivery with `handler` until `shutdown` completes:
    /// acknowledged when it returns `Ok` (unless it settled the delivery
    /// itself), delivered again after the nak delay when it returns `Err`.
    /// Deliveries are handled one at a time, in order. While the handler
    /// runs, the delivery's ack wait is extended, so a slow handler (a model
    /// call) is not raced by a redelivery, and registered tools go on being
    /// served.
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
        mut handler: F,
    ) -> Result<(), DeliveryError>
    where
        F: FnMut(Delivery) -> Fut + Send,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::fmt::Display,
    {
        let mut deliveries = self.deliveries().await?;
        tokio::pin!(shutdown);
        // A delivery pulled while the handler was busy with another.
        let mut waiting: Option<Delivery> = None;
        let mut ended = false;
        loop {
            if (&mut shutdown).now_or_never().is_some() {
                break;
            }
            let delivery = match waiting.take() {
                Some(delivery) => delivery,
                None if ended => {
                    return Err(DeliveryErrorKind::Pull(self.inner.consumer_name.clone()).into());
                }
                None => tokio::select! {
                    () = &mut shutdown => break,
                    next = deliveries.next() => match next {
                        None => {
                            ended = true;
                            continue;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "Delivery stream hiccup; it resumes by itself.");
                            continue;
                        }
                        Some(Ok(delivery)) => delivery,
                    },
                },
            };
            let id = delivery.id().to_owned();
            let message = delivery.message.clone();
            let acked = delivery.acked.clone();
            let work = handler(delivery);
            tokio::pin!(work);
            let mut keepalive = keepalive_timer(self.inner.settings.ack_wait);
            keepalive.tick().await;
            // Keep polling while the handler works, so tool calls are served
            // meanwhile; hold (and keep alive) the next other delivery.
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break outcome,
                    _ = keepalive.tick() => {
                        progress(&message).await;
                        if let Some(next) = &waiting {
                            progress(&next.message).await;
                        }
                    }
                    next = deliveries.next(), if waiting.is_none() && !ended => match next {
                        None => ended = true,
                        Some(Err(e)) => tracing::warn!(error = %e, "Delivery stream hiccup; it resumes by itself."),
                        Some(Ok(next)) => waiting = Some(next),
                    },
                }
            };
            if acked.load(Ordering::SeqCst) {
                continue;
            }
            let kind = match &outcome {
                Ok(()) => AckKind::Ack,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "Handler failed; the delivery will be delivered again.");
                    AckKind::Nak(Some(self.inner.settings.nak_delay))
                }
            };
            if let Err(e) = message.ack_with(kind).await {
                tracing::warn!(%id, error = %e, "Could not settle the delivery.");
            }
        }
        drop(deliveries);
        self.inner.tasks.close();
        if tokio::time::timeout(self.inner.settings.shutdown_grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "Tool calls still running after the shutdown grace; they will be delivered again."
            );
        }
        self.inner.tasks.reopen();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::EventBuilder;
    use schemas::EventBuilderV10;

    fn call(data: serde_json::Value) -> Received {
        let event = EventBuilderV10::new()
            .id("c1")
            .source("/agents/planner")
            .ty("io.agentmesh.tool.call")
            .subject("repo.read")
            .extension("target", "coder")
            .data("application/json", data)
            .build()
            .unwrap();
        let (headers, payload) = schemas::encode_binary(&event);
        Received::from_delivery("mesh.deliver.coder.planner", Some(&headers), &payload).unwrap()
    }

    #[test]
    fn decodes_deliveries() {
        let r = call(serde_json::json!({"tool": "repo.read", "arguments": {"path": "a"}}));
        assert_eq!(r.sender().as_str(), "planner");
        assert_eq!(r.target().map(AgentId::as_str), Some("coder"));
        assert_eq!(r.subject(), Some("repo.read"));
        assert_eq!(tool_arguments(&r), serde_json::json!({"path": "a"}));
        // Bare arguments from a non-SDK caller.
        assert_eq!(
            tool_arguments(&call(serde_json::json!({"path": "b"}))),
            serde_json::json!({"path": "b"})
        );
    }

    fn message_from(source: &str) -> (HeaderMap, bytes::Bytes) {
        let event = EventBuilderV10::new()
            .id("c1")
            .source(source)
            .ty("io.agentmesh.message")
            .build()
            .unwrap();
        schemas::encode_binary(&event)
    }

    #[test]
    fn rejects_source_mismatch_and_bad_subjects() {
        let (headers, payload) = message_from("/agents/mallory");
        let err = Received::from_delivery("mesh.deliver.coder.planner", Some(&headers), &payload)
            .unwrap_err();
        assert!(matches!(err, Invalid::SourceMismatch { .. }), "{err:?}");

        // A valid event, so only the subject can be at fault.
        let (headers, payload) = message_from("/agents/planner");
        assert!(
            Received::from_delivery("mesh.deliver.coder.planner", Some(&headers), &payload).is_ok()
        );
        let err =
            Received::from_delivery("mesh.deliver.coder", Some(&headers), &payload).unwrap_err();
        assert!(
            matches!(&err, Invalid::Subject(subject) if subject == "mesh.deliver.coder"),
            "{err:?}"
        );
    }
}

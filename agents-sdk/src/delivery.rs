//! Deliveries: the events the mesh routed to this agent, read from its own
//! durable consumer (`agent-<id>` on `MESH_DELIVER`, filtered on
//! `mesh.deliver.<id>.>`), decoded and validated with `schemas`.
//!
//! A delivery is acknowledged only once it was handled; one that is not
//! (a failed handler, a crash) is delivered again. A message that is not a
//! valid mesh event can never succeed, so it is terminated once, not retried.
//! `tool.call`s for registered tools are answered by the SDK (read from the
//! agent's durable on `MESH_CALL` where the mesh has one, so they never wait
//! behind other deliveries), and answers to this process's own calls are
//! consumed by those calls. A handler that fails is retried with backoff up
//! to the agent's `max_attempts`; then the agent gives up, reports it as an
//! observation, and terminates the delivery.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use schemas::{EventType, Invalid, headers, subjects};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::a2a::is_a2a;
use crate::error::{DeliveryError, DeliveryErrorKind, PublishError, ToolError};
use crate::feed::Feed;
use crate::inner::{A2aService, Agent, Published, ToolHandler};
use crate::metrics::{Counters, Running};
use crate::payload;
use crate::received::Received;
use crate::workflow::{Step, Workflow};

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
    // Shared with the handle `serve_with` keeps while the handler runs.
    message: Arc<jetstream::Message>,
    received: Arc<Received>,
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
        Workflow::after(&self.agent, &self.received)
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
    Workflow::after(agent, call)
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

/// Ticks every half ack wait, the first time half an ack wait from now:
/// when to tell JetStream a delivery is still being worked on. (No tick at
/// once: a timer due now still waits for the timer wheel's next
/// millisecond, which would cost every delivery a millisecond.)
fn keepalive_timer(ack_wait: Duration) -> tokio::time::Interval {
    let period = (ack_wait / 2).max(Duration::from_millis(100));
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
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
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = keepalive.tick() => progress(message).await,
        }
    }
}

/// The stream of [`Agent::deliveries`].
pub struct Deliveries {
    inner: Pin<Box<dyn Stream<Item = Result<Delivery, DeliveryError>> + Send>>,
    /// Stops the agent's tool-call reader with the stream.
    _calls: Option<DropGuard>,
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

/// The wait before attempt `attempt + 1` of a delivery whose attempt
/// `attempt` failed: `base`, doubled for each attempt after the first, at
/// most `max`.
pub(crate) fn backoff(base: Duration, attempt: u32, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    base.saturating_mul(1u32 << doublings).min(max)
}

/// The id of the give-up report on delivery `id` from `source` to `target`:
/// the same for every attempt to report it, so a report published again
/// after a crash is dropped by `MESH_INGRESS` (`Nats-Msg-Id`).
fn report_id(target: &str, source: &str, id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("agentmesh:gave-up/{target}/{source}/{id}").as_bytes(),
    )
    .to_string()
}

impl Delivery {
    /// A second handle on the same delivery, kept by `serve_with` while the
    /// handler owns the first.
    fn twin(&self) -> Delivery {
        Delivery {
            agent: self.agent.clone(),
            message: self.message.clone(),
            received: self.received.clone(),
            acked: self.acked.clone(),
        }
    }

    /// Records a failed attempt at handling this delivery. Before the
    /// agent's [`max_attempts`](crate::AgentBuilder::max_attempts) it is
    /// refused and delivered again after a backoff (the nak delay, doubled
    /// per attempt); on the last attempt the agent gives up: it publishes an
    /// `io.agentmesh.observation` saying so (data
    /// [`payload::DeliveryGaveUp`], subject `delivery.gave_up`, following
    /// the delivery in its trace, so the audit and `meshctl trace` show it)
    /// and terminates the delivery. [`Agent::serve_with`] calls this when
    /// its handler returns `Err`.
    pub async fn fail(&self, error: impl std::fmt::Display) -> Result<Failed, DeliveryError> {
        let attempt = u32::try_from(self.delivery_count()).unwrap_or(u32::MAX);
        let settings = &self.agent.inner.settings;
        let error = error.to_string();
        if attempt >= settings.max_attempts {
            return self.give_up(attempt, &error).await;
        }
        let delay = backoff(settings.nak_delay, attempt, settings.max_backoff);
        tracing::warn!(id = self.id(), from = %self.sender(), attempt, max_attempts = settings.max_attempts, retry_in = ?delay, %error, "Handler failed; the delivery will be attempted again.");
        self.nak(Some(delay)).await?;
        Counters::add(&self.agent.inner.counters.retries);
        Ok(Failed::Retry {
            attempt,
            max_attempts: settings.max_attempts,
            delay,
        })
    }

    /// Reports that the agent gave up after `attempts`, then terminates the
    /// delivery. If the report cannot be published the delivery is refused
    /// instead, so the next delivery reports it.
    async fn give_up(&self, attempts: u32, error: &str) -> Result<Failed, DeliveryError> {
        let me = self.agent.inner.id.to_string();
        let gave_up = payload::GaveUp {
            event_id: self.id().to_owned(),
            source: self.sender().to_string(),
            r#type: self.event_type().as_str().to_owned(),
            attempts,
            error: error.to_owned(),
        };
        let text = format!(
            "{me} gave up on {} {} from {} after {attempts} attempts: {error}",
            self.event_type().short_name(),
            gave_up.event_id,
            gave_up.source,
        );
        let published = self
            .workflow()
            .observation(text)
            .with("gave_up", &gave_up)
            .subject(payload::GAVE_UP_SUBJECT)
            .id(report_id(&me, &gave_up.source, &gave_up.event_id))
            .publish()
            .await;
        let report = match published {
            Ok(published) => published,
            Err(e) => {
                let settings = &self.agent.inner.settings;
                let delay = backoff(settings.nak_delay, attempts, settings.max_backoff);
                let _ = self.nak(Some(delay)).await;
                return Err(DeliveryError::with_source(
                    DeliveryErrorKind::Report(self.id().to_owned()),
                    e,
                ));
            }
        };
        self.term().await?;
        Counters::add(&self.agent.inner.counters.gave_up);
        tracing::warn!(id = self.id(), from = %self.sender(), attempts, %error, report = %report.id, "Gave up on a delivery after its last attempt.");
        Ok(Failed::GaveUp {
            attempts,
            report: report.id,
        })
    }
}

/// What [`Delivery::fail`] did with a failed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failed {
    /// It is delivered again after `delay`.
    Retry {
        /// The attempt that failed (1 the first time).
        attempt: u32,
        /// The agent's limit.
        max_attempts: u32,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// The agent gave up: the delivery is terminated and reported.
    GaveUp {
        /// How many attempts were made.
        attempts: u32,
        /// The id of the `io.agentmesh.observation` reporting it.
        report: String,
    },
}

/// What [`Agent::deliveries`] does: the agent's deliveries as a stream,
/// its tool calls served meanwhile.
pub(crate) async fn deliveries(agent: &Agent) -> Result<Deliveries, DeliveryError> {
    let settings = &agent.inner.settings;
    let feed = Feed::start(
        agent.inner.consumer.clone(),
        agent.inner.consumer_name.clone(),
        settings.prefetch,
        settings.ack_wait,
        agent.inner.counters.buffered_deliveries.clone(),
    );
    let calls = agent.inner.calls.clone().map(|calls| {
        let stop = CancellationToken::new();
        tokio::spawn(serve_calls(agent.clone(), calls, stop.clone()));
        stop.drop_guard()
    });
    let stream = futures::stream::unfold((agent.clone(), feed), |(agent, feed)| async move {
        loop {
            match feed.next().await {
                Err(e) => return Some((Err(e), (agent, feed))),
                Ok(message) => {
                    if let Routed::Yield(delivery) = route(&agent, message).await {
                        return Some((Ok(*delivery), (agent, feed)));
                    }
                }
            }
        }
    });
    Ok(Deliveries {
        inner: Box::pin(stream),
        _calls: calls,
    })
}

/// Answers the tool calls of the agent's `MESH_CALL` durable until
/// `stop`: a call is taken only when a tool slot is free, and calls
/// pulled ahead (at most `max_concurrent_tools`) are kept alive.
async fn serve_calls(agent: Agent, calls: PullConsumer, stop: CancellationToken) {
    let settings = &agent.inner.settings;
    let feed = Feed::start(
        calls,
        format!("{}/{}", subjects::STREAM_CALL, agent.inner.consumer_name),
        settings.max_concurrent_tools,
        settings.ack_wait,
        agent.inner.counters.buffered_calls.clone(),
    );
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = agent.inner.tool_slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = feed.next() => message,
        };
        match message {
            Ok(message) => route_call(&agent, message, permit).await,
            Err(e) => {
                tracing::warn!(error = %e, "Tool-call stream hiccup; it resumes by itself.")
            }
        }
    }
}

/// Answers one message of the `MESH_CALL` durable: a call of a
/// registered tool runs; any other is acknowledged here, its copy on
/// `mesh.deliver` being yielded to the agent's own code as before.
async fn route_call(agent: &Agent, message: jetstream::Message, permit: OwnedSemaphorePermit) {
    let received =
        match Received::from_delivery(&message.subject, message.headers.as_ref(), &message.payload)
        {
            Ok(received) => received,
            Err(e) => {
                terminate_invalid(agent, &message, &e).await;
                return;
            }
        };
    if !verified(agent, &message, &received).await {
        return;
    }
    match received
        .subject()
        .and_then(|tool| agent.inner.tool_handler(tool))
    {
        Some(handler) if received.event_type() == EventType::ToolCall => {
            spawn_tool(agent, message, received, handler, Some(permit)).await;
        }
        _ => {
            if let Err(e) = message.ack().await {
                tracing::debug!(error = %e, "Could not acknowledge a call left to the delivery stream.");
            }
        }
    }
}

/// Whether `message` carries a valid decision signature by a trusted
/// signer (always, when verification is off). One that does not is
/// logged, counted and acknowledged here: it never reaches a handler,
/// and it is not delivered again.
async fn verified(agent: &Agent, message: &jetstream::Message, received: &Received) -> bool {
    let Some(trust) = &agent.inner.trust else {
        return true;
    };
    let Err(reason) = trust
        .verify(
            received.mesh_event(),
            message.headers.as_ref(),
            &message.payload,
        )
        .await
    else {
        return true;
    };
    Counters::add(&agent.inner.counters.refused);
    tracing::warn!(subject = %message.subject, id = received.id(), from = %received.sender(), refused = reason.label(), %reason, "Refusing a delivery whose decision signature does not verify.");
    if let Err(e) = message.ack().await {
        tracing::warn!(error = %e, "Could not acknowledge the refused delivery.");
    }
    false
}

/// Terminates a message that is not a valid mesh event: it can never
/// succeed, so it is ended once rather than retried.
async fn terminate_invalid(agent: &Agent, message: &jetstream::Message, error: &Invalid) {
    tracing::warn!(subject = %message.subject, %error, "Terminating a delivery that is not a valid mesh event.");
    Counters::add(&agent.inner.counters.invalid);
    if let Err(e) = message.ack_with(AckKind::Term).await {
        tracing::warn!(error = %e, "Could not terminate the invalid delivery.");
    }
}

async fn route(agent: &Agent, message: jetstream::Message) -> Routed {
    let received =
        match Received::from_delivery(&message.subject, message.headers.as_ref(), &message.payload)
        {
            Ok(received) => received,
            Err(e) => {
                terminate_invalid(agent, &message, &e).await;
                return Routed::Handled;
            }
        };
    if !verified(agent, &message, &received).await {
        return Routed::Handled;
    }
    if let Some(causation) = received.causation_id()
        && agent
            .inner
            .was_awaited(causation, received.event_type(), received.sender().as_str())
    {
        tracing::debug!(id = received.id(), %causation, "Answer already consumed by its call; acknowledging.");
        if let Err(e) = message.ack().await {
            tracing::warn!(error = %e, "Could not acknowledge a consumed answer.");
        }
        return Routed::Handled;
    }
    if received.event_type() == EventType::ToolCall
        && let Some(handler) = received
            .subject()
            .and_then(|tool| agent.inner.tool_handler(tool))
    {
        let also_on_calls = message
            .headers
            .as_ref()
            .is_some_and(|h| h.get(headers::CALL).is_some());
        if also_on_calls && agent.inner.calls.is_some() {
            // The same call, stored on `mesh.call`: answered from there.
            tracing::debug!(
                id = received.id(),
                "Tool call answered from MESH_CALL; acknowledging its delivery."
            );
            if let Err(e) = message.ack().await {
                tracing::debug!(error = %e, "Could not acknowledge the delivery copy of a tool call.");
            }
        } else {
            spawn_tool(agent, message, received, handler, None).await;
        }
        return Routed::Handled;
    }
    if let Some(server) = &agent.inner.a2a
        && is_a2a(&received)
        && received
            .json::<Value>()
            .is_ok_and(|request| request.get("method").is_some())
    {
        spawn_a2a(agent, message, received, server.clone());
        return Routed::Handled;
    }
    Routed::Yield(Box::new(Delivery {
        agent: agent.clone(),
        message: Arc::new(message),
        received: Arc::new(received),
        acked: Arc::new(AtomicBool::new(false)),
    }))
}

/// Answers an A2A request in its own task: acked once the response is
/// published, refused (delivered again) if it cannot be.
fn spawn_a2a(
    agent: &Agent,
    message: jetstream::Message,
    received: Received,
    server: Arc<dyn A2aService>,
) {
    let agent = agent.clone();
    agent.inner.tasks.clone().spawn(async move {
        let answer = server.answer(agent.clone(), received.clone());
        match with_keepalive(&message, agent.inner.settings.ack_wait, answer).await {
            Ok(()) => {
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "Could not acknowledge an answered A2A request.");
                }
            }
            Err(e) => {
                tracing::warn!(request = received.id(), error = %e, "Could not publish the A2A response; the request will be delivered again.");
                let _ = message.ack_with(AckKind::Nak(Some(agent.inner.settings.nak_delay))).await;
            }
        }
    });
}

/// Runs a tool handler in its own task and answers the call: acked once
/// the result is published, refused (delivered again) if it cannot be.
async fn spawn_tool(
    agent: &Agent,
    message: jetstream::Message,
    received: Received,
    handler: Arc<dyn ToolHandler>,
    permit: Option<OwnedSemaphorePermit>,
) {
    // Waiting for a slot holds back the stream: no more pulls while full.
    let permit = match permit {
        Some(permit) => permit,
        None => match agent.inner.tool_slots.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return,
        },
    };
    let agent = agent.clone();
    agent.inner.tasks.clone().spawn(async move {
        let _permit = permit;
        let _running = Running::start(&agent.inner.counters.tools_running);
        let tool = received.subject().unwrap_or_default().to_owned();
        let call = handler.call(
            agent.clone(),
            received.clone(),
            tool.clone(),
            tool_arguments(&received),
        );
        let run = std::panic::AssertUnwindSafe(call).catch_unwind();
        let result = with_keepalive(&message, agent.inner.settings.ack_wait, run).await;
        let result = result.unwrap_or_else(|_| Err(ToolError::new(format!("tool `{tool}` panicked"))));
        if let Err(e) = &result {
            tracing::debug!(%tool, caller = %received.sender(), error = %e, "Tool failed.");
        }
        match answer_tool(&agent, &received, result).await {
            Ok(published) => {
                tracing::debug!(%tool, call = received.id(), result = %published.id, "Tool call answered.");
                Counters::add(&agent.inner.counters.tool_calls);
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

/// What [`Agent::serve`] does: [`serve_with`] a handler that refuses calls
/// of tools the agent does not serve and acknowledges anything else.
pub(crate) async fn serve(
    agent: &Agent,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DeliveryError> {
    serve_with(agent, shutdown, |delivery: Delivery| async move {
        if delivery.event_type() == EventType::ToolCall {
            let tool = delivery.subject().unwrap_or_default().to_owned();
            let refusal = ToolError::new(format!("agent `{}` does not serve tool `{tool}`", delivery.agent.inner.id));
            delivery.answer_tool(Err(refusal)).await.map(|_| ())
        } else {
            tracing::info!(id = delivery.id(), r#type = %delivery.event_type(), from = %delivery.sender(), "No handler for this delivery; acknowledging it.");
            Ok(())
        }
    })
    .await
}

/// What [`Agent::serve_with`] does: every delivery handled by `handler`
/// until `shutdown`, then the shutdown grace for what runs.
pub(crate) async fn serve_with<F, Fut, E>(
    agent: &Agent,
    shutdown: impl Future<Output = ()> + Send,
    mut handler: F,
) -> Result<(), DeliveryError>
where
    F: FnMut(Delivery) -> Fut + Send,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let max = agent.inner.settings.max_concurrent_deliveries;
    let mut deliveries = deliveries(agent).await?;
    tokio::pin!(shutdown);
    let mut running = FuturesUnordered::new();
    // A delivery pulled while every handler slot was busy: polling on
    // lets the stream serve tool calls that come as deliveries.
    let mut waiting: Option<Delivery> = None;
    let mut keepalive = keepalive_timer(agent.inner.settings.ack_wait);
    let mut ended = false;
    loop {
        if (&mut shutdown).now_or_never().is_some() {
            break;
        }
        if running.len() < max
            && let Some(delivery) = waiting.take()
        {
            running.push(handle(agent, delivery, &mut handler));
            continue;
        }
        if ended && waiting.is_none() && running.is_empty() {
            return Err(DeliveryErrorKind::Pull(agent.inner.consumer_name.clone()).into());
        }
        // In this order: finishing handlers frees slots for the next.
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(()) = running.next(), if !running.is_empty() => {}
            next = deliveries.next(), if waiting.is_none() && !ended => match next {
                None => ended = true,
                Some(Err(e)) => tracing::warn!(error = %e, "Delivery stream hiccup; it resumes by itself."),
                Some(Ok(next)) => waiting = Some(next),
            },
            _ = keepalive.tick(), if waiting.is_some() => {
                if let Some(next) = &waiting {
                    progress(&next.message).await;
                }
            }
        }
    }
    if let Some(left) = waiting.take() {
        let _ = left.nak(None).await;
    }
    let grace = agent.inner.settings.shutdown_grace;
    let finished =
        tokio::time::timeout(grace, async { while running.next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            ?grace,
            "Handlers still running after the shutdown grace; their deliveries will be delivered again."
        );
    }
    drop(running);
    drop(deliveries);
    agent.inner.tasks.close();
    if tokio::time::timeout(grace, agent.inner.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "Tool calls still running after the shutdown grace; they will be delivered again."
        );
    }
    agent.inner.tasks.reopen();
    Ok(())
}

/// Runs `handler` on one delivery, keeping it alive meanwhile, then
/// settles it: ack on `Ok`, [`Delivery::fail`] on `Err` or a panic.
fn handle<'a, F, Fut, E>(
    agent: &Agent,
    delivery: Delivery,
    handler: &mut F,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>
where
    F: FnMut(Delivery) -> Fut + Send,
    Fut: Future<Output = Result<(), E>> + Send + 'a,
    E: std::fmt::Display + 'a,
{
    let twin = delivery.twin();
    let max_attempts = agent.inner.settings.max_attempts;
    let attempt = u32::try_from(twin.delivery_count()).unwrap_or(u32::MAX);
    if attempt > max_attempts {
        // Every attempt allowed has been made, and none ended with a
        // result (the agent stopped, or the ack wait ran out): report it
        // without a further one.
        return Box::pin(async move {
            let error = "the earlier attempts ended without a result (the agent stopped or the ack wait ran out)";
            if let Err(e) = twin.give_up(attempt - 1, error).await {
                tracing::warn!(id = twin.id(), error = %e, "Could not give up on a delivery; it will be delivered again.");
            }
        });
    }
    let work = handler(delivery);
    let ack_wait = agent.inner.settings.ack_wait;
    let agent = agent.clone();
    Box::pin(async move {
        let failure: Option<String> = {
            let _running = Running::start(&agent.inner.counters.handlers_running);
            // The error becomes text as soon as the handler returns.
            let work = async move {
                match std::panic::AssertUnwindSafe(work).catch_unwind().await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("the handler panicked".to_owned()),
                }
            };
            with_keepalive(&twin.message, ack_wait, work).await
        };
        if twin.is_settled() {
            return;
        }
        let Some(failure) = failure else {
            match twin.ack().await {
                Ok(()) => Counters::add(&agent.inner.counters.handled),
                Err(e) => {
                    tracing::warn!(id = twin.id(), error = %e, "Could not acknowledge a handled delivery; it will be delivered again.")
                }
            }
            return;
        };
        if let Err(e) = twin.fail(failure).await {
            tracing::warn!(id = twin.id(), error = %e, "Could not settle a failed delivery; it will be delivered again.");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use schemas::AgentId;
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
    fn backoff_doubles_per_attempt_up_to_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let waits: Vec<u64> = (1..=8).map(|a| backoff(base, a, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(base, u32::MAX, max), max);
    }

    #[test]
    fn a_report_id_is_the_same_for_the_same_delivery_only() {
        let a = report_id("coder", "planner", "e1");
        assert_eq!(a, report_id("coder", "planner", "e1"));
        // The Python SDK derives the same id (sdk/python/tests/test_events.py).
        assert_eq!(a, "ea939efb-5d00-5848-ac0c-a10ddaea060f");
        assert_ne!(a, report_id("coder", "reviewer", "e1"));
        assert_ne!(a, report_id("coder", "planner", "e2"));
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

//! Calls that wait for the mesh: tool calls, requests, and decision receipts.
//!
//! A call listens before it publishes: it registers with the agent's inbox
//! (receipts and deliveries, see `inbox.rs`), then publishes. A deny or
//! invalid receipt for the call's id ends it with the receipt; an answer
//! from the callee whose `causationid` is the call's id ends it with the
//! answer; otherwise it times out.

use std::future::IntoFuture;
use std::time::Duration;

use schemas::{Decision, DecisionReceipt, EventType};
use serde_json::Value;

use serde::Serialize;

use crate::error::{CallError, CallErrorKind, DecisionError, DecisionErrorKind, PublishErrorKind};
use crate::inbox::Arrival;
use crate::inner::{Agent, BoxFuture};
use crate::payload;
use crate::received::Received;
use crate::workflow::{Step, Workflow, to_json};

/// The calls a workflow makes: each publishes a step and waits for its
/// answer.
impl Workflow {
    /// Calls `tool` with `args` and waits for its result: the call goes to
    /// the agent whose card lists the tool (or the one named with
    /// [`on`](ToolCallRequest::on)), through policy.
    ///
    /// ```no_run
    /// # async fn demo(wf: agents_sdk::Workflow) -> Result<(), Box<dyn std::error::Error>> {
    /// use agents_sdk::CallErrorKind;
    /// use serde_json::json;
    /// use std::time::Duration;
    ///
    /// let text = wf.call_tool("repo.read", json!({"path": "README.md"})).await?;
    /// match wf.call_tool("shell.exec", json!({"cmd": "rm -rf /"}))
    ///     .timeout(Duration::from_secs(5))
    ///     .await
    /// {
    ///     Err(e) if e.denial().is_some() => println!("denied: {:?}", e.denial().map(|r| &r.reasons)),
    ///     Err(e) if matches!(e.kind(), CallErrorKind::TimedOut { .. }) => println!("{e}"),
    ///     other => println!("{other:?}"),
    /// }
    /// # let _ = text;
    /// # Ok(())
    /// # }
    /// ```
    pub fn call_tool(&self, tool: impl Into<String>, args: impl Serialize) -> ToolCallRequest {
        ToolCallRequest::new(self.clone(), tool.into(), to_json(args))
    }

    /// Sends `body` to agent `target` as an `io.agentmesh.message` and waits
    /// for the reply (a message from `target` whose `causationid` is the
    /// request's id; see [`Delivery::reply`](crate::Delivery::reply)).
    ///
    /// ```no_run
    /// # async fn demo(wf: agents_sdk::Workflow) -> Result<(), Box<dyn std::error::Error>> {
    /// use agents_sdk::payload;
    /// use serde_json::json;
    ///
    /// let reply = wf.request("reviewer", json!({"diff": "+ fn parse() {}"})).await?;
    /// let answer: payload::Message = reply.json()?;
    /// println!("{} says {}", reply.sender(), answer.body);
    /// # Ok(())
    /// # }
    /// ```
    pub fn request(&self, target: impl Into<String>, body: impl Serialize) -> Request {
        Request::new(self.message(target, body))
    }
}

/// A tool call being prepared; await it for the tool's result.
#[must_use = "a tool call is only made when awaited"]
#[derive(Debug)]
pub struct ToolCallRequest {
    wf: Workflow,
    tool: String,
    args: Result<Value, String>,
    provider: Option<String>,
    timeout: Duration,
}

impl ToolCallRequest {
    pub(crate) fn new(wf: Workflow, tool: String, args: Result<Value, String>) -> Self {
        let timeout = wf.agent.inner.settings.call_timeout;
        Self {
            wf,
            tool,
            args,
            provider: None,
            timeout,
        }
    }

    /// Sends the call to this agent instead of looking the tool up in
    /// `mesh-agents`.
    pub fn on(mut self, agent: impl Into<String>) -> Self {
        self.provider = Some(agent.into());
        self
    }

    /// How long to wait for the result (default: the agent's call timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn run(self) -> Result<Value, CallError> {
        let provider = match self.provider {
            Some(provider) => Some(provider),
            None => self
                .wf
                .agent
                .inner
                .directory
                .find_by_tool(&self.tool)
                .await
                .map_err(|e| CallError::with_source(CallErrorKind::Broker, e))?
                .into_iter()
                .next()
                .map(|card| card.id),
        };
        let args = self
            .args
            .map_err(|e| CallError::new(CallErrorKind::Publish(PublishErrorKind::Data(e))))?;
        let mut step = self
            .wf
            .step(EventType::ToolCall)
            .data(payload::ToolCall {
                tool: self.tool.clone(),
                arguments: args,
            })
            .subject(self.tool.clone());
        if let Some(provider) = provider {
            step = step.target(provider);
        }
        let Some(answer) = exchange(step, EventType::ToolResult, self.timeout).await? else {
            return Err(CallErrorKind::NoProvider(self.tool).into());
        };
        let result: payload::ToolResult = answer
            .json()
            .map_err(|e| CallError::with_source(CallErrorKind::InvalidAnswer, e))?;
        if result.ok {
            Ok(result.result.unwrap_or(Value::Null))
        } else {
            Err(CallErrorKind::ToolFailed {
                tool: self.tool,
                message: result
                    .error
                    .unwrap_or_else(|| "the tool reported an error without a message".to_owned()),
            }
            .into())
        }
    }
}

impl IntoFuture for ToolCallRequest {
    type Output = Result<Value, CallError>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// A request (a message that expects a reply) being prepared; await it for
/// the reply.
#[must_use = "a request is only sent when awaited"]
#[derive(Debug)]
pub struct Request {
    step: Step,
    timeout: Duration,
}

impl Request {
    pub(crate) fn new(step: Step) -> Self {
        Self {
            timeout: step.workflow().agent.inner.settings.call_timeout,
            step,
        }
    }

    /// How long to wait for the reply (default: the agent's call timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn run(self) -> Result<Received, CallError> {
        match exchange(self.step, EventType::Message, self.timeout).await? {
            Some(reply) => Ok(reply),
            // `message` always has a target, so an allow without one cannot
            // happen; treat it as the broker misbehaving.
            None => Err(CallErrorKind::Broker.into()),
        }
    }
}

impl IntoFuture for Request {
    type Output = Result<Received, CallError>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// Publishes `step` and waits for its answer of type `answer_type` from the
/// step's target. `Ok(None)`: policy allowed a step without a target, so no
/// answer can come.
async fn exchange(
    step: Step,
    answer_type: EventType,
    timeout: Duration,
) -> Result<Option<Received>, CallError> {
    let prepared = step.prepare()?;
    let agent = prepared.wf.agent.clone();
    let id = prepared.id().to_owned();
    let target = prepared.target.clone();
    if let Some(target) = &target {
        agent.inner.remember_call(&id, answer_type, target);
    }
    // Listen before publishing, so neither receipt nor answer can be missed.
    let mut waiting = agent
        .inner
        .wait_for(&id, true)
        .await
        .map_err(|e| CallError::with_source(CallErrorKind::Broker, e))?;
    let wf = prepared.wf.clone();
    prepared.send().await?;

    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut decision: Option<Decision> = None;
    loop {
        let arrival = tokio::select! {
            () = &mut deadline => {
                return Err(CallErrorKind::TimedOut { after: timeout, decision }.into());
            }
            arrival = waiting.arrivals.recv() => match arrival {
                Some(arrival) => arrival,
                None => return Err(CallErrorKind::Broker.into()),
            },
        };
        match arrival {
            Arrival::Decision(receipt) => match receipt.decision {
                Decision::Allow if target.is_none() => return Ok(None),
                Decision::Allow => decision = Some(Decision::Allow),
                Decision::Deny | Decision::Invalid => {
                    return Err(CallErrorKind::Denied(receipt).into());
                }
            },
            Arrival::Answer(answer) => {
                // Only the callee answers, with the expected type.
                if answer.event_type() == answer_type
                    && Some(answer.sender().as_str()) == target.as_deref()
                {
                    wf.set_last(answer.id(), answer.sender().as_str(), answer.trace());
                    return Ok(Some(*answer));
                }
            }
        }
    }
}

/// A wait for the decision receipt of an event this agent published; await
/// it for the [`DecisionReceipt`].
#[must_use = "a decision wait does nothing until awaited"]
#[derive(Debug)]
pub struct DecisionWait {
    agent: Agent,
    event_id: String,
    timeout: Duration,
}

impl DecisionWait {
    /// A wait for the receipt of `event_id`, published by `agent`, for the
    /// agent's call timeout.
    pub(crate) fn new(agent: Agent, event_id: String) -> Self {
        Self {
            timeout: agent.inner.settings.call_timeout,
            agent,
            event_id,
        }
    }

    /// How long to wait (default: the agent's call timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn run(self) -> Result<DecisionReceipt, DecisionError> {
        // The inbox has read this agent's receipts since it connected and
        // keeps the recent ones, so a receipt that came before the wait is
        // handed over at once.
        let mut waiting = self
            .agent
            .inner
            .wait_for(&self.event_id, false)
            .await
            .map_err(|e| DecisionError::with_source(DecisionErrorKind::Broker, e))?;
        let wait = async {
            while let Some(arrival) = waiting.arrivals.recv().await {
                if let Arrival::Decision(receipt) = arrival
                    && receipt.event_id == self.event_id
                {
                    return Ok(*receipt);
                }
            }
            Err(DecisionError::new(DecisionErrorKind::Broker))
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(DecisionErrorKind::TimedOut {
                event_id: self.event_id,
                after: self.timeout,
            }
            .into()),
        }
    }
}

impl IntoFuture for DecisionWait {
    type Output = Result<DecisionReceipt, DecisionError>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

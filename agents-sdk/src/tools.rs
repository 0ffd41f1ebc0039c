//! Serving tools: what a tool handler receives ([`ToolCall`]); what it
//! returns on failure is [`ToolError`] (`error`).

use std::future::Future;

use schemas::{AgentId, TraceParent};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ToolError;
use crate::inner::{Agent, BoxFuture, ToolHandler};
use crate::received::Received;
use crate::workflow::Workflow;

/// One `tool.call` delivered to this agent, as its handler sees it.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use agents_sdk::{Agent, ToolCall, ToolError, ToolSpec};
/// use serde::Deserialize;
/// use serde_json::json;
///
/// #[derive(Deserialize)]
/// struct Args {
///     suite: String,
/// }
///
/// let agent = Agent::builder("coder")
///     .tool(ToolSpec::new("tests.run"), |call: ToolCall| async move {
///         let args: Args = call.args()?;
///         if args.suite.is_empty() {
///             return Err(ToolError::new("`suite` is empty"));
///         }
///         // Steps recorded here join the caller's trace, after the call.
///         call.workflow().reasoning(format!("{} asked for {}", call.caller(), args.suite)).await?;
///         Ok(json!({"suite": args.suite, "passed": true}))
///     })
///     .connect("nats://127.0.0.1:4222")
///     .await?;
/// # let _ = agent;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub(crate) agent: Agent,
    pub(crate) received: Received,
    pub(crate) tool: String,
    pub(crate) arguments: Value,
}

impl ToolCall {
    /// The tool called (the event's `subject`).
    pub fn tool(&self) -> &str {
        &self.tool
    }

    /// The calling agent.
    pub fn caller(&self) -> &AgentId {
        self.received.sender()
    }

    /// The call's event id (the result's `causationid`).
    pub fn id(&self) -> &str {
        self.received.id()
    }

    /// The call's trace.
    pub fn trace(&self) -> TraceParent {
        self.received.trace()
    }

    /// The whole call event.
    pub fn received(&self) -> &Received {
        &self.received
    }

    /// The arguments as JSON.
    pub fn arguments(&self) -> &Value {
        &self.arguments
    }

    /// The arguments as `T`.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, ToolError> {
        serde_json::from_value(self.arguments.clone())
            .map_err(|e| ToolError::new(format!("invalid arguments for `{}`: {e}", self.tool)))
    }

    /// One named argument as `T`.
    pub fn arg<T: DeserializeOwned>(&self, name: &str) -> Result<T, ToolError> {
        let value = self.arguments.get(name).ok_or_else(|| {
            ToolError::new(format!("missing argument `{name}` for `{}`", self.tool))
        })?;
        serde_json::from_value(value.clone()).map_err(|e| {
            ToolError::new(format!(
                "invalid argument `{name}` for `{}`: {e}",
                self.tool
            ))
        })
    }

    /// The serving agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The caller's workflow, continued by the serving agent: steps published
    /// on it (reasoning, its own tool calls) join the caller's trace and
    /// follow the call.
    pub fn workflow(&self) -> Workflow {
        Workflow::after(&self.agent, &self.received)
    }
}

/// A tool handler as the builder takes it: a function of the [`ToolCall`].
impl<F, Fut> ToolHandler for F
where
    F: Fn(ToolCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ToolError>> + Send + 'static,
{
    fn call(
        &self,
        agent: Agent,
        received: Received,
        tool: String,
        arguments: Value,
    ) -> BoxFuture<Result<Value, ToolError>> {
        Box::pin(self(ToolCall {
            agent,
            received,
            tool,
            arguments,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::{error::Error as StdError, fmt, io};

    use super::ToolError;
    use crate::{CallError, CallErrorKind};

    /// An error that prints only its own text, leaving its cause to `source()`.
    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("reading the suite failed")
        }
    }

    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_printed_is_not_repeated() {
        let err = CallError::with_source(
            CallErrorKind::Broker,
            io::Error::new(io::ErrorKind::TimedOut, "timed out"),
        );
        let printed = err.to_string();
        assert!(printed.ends_with(": timed out"), "{printed}");
        assert_eq!(ToolError::from(err).message(), printed);
    }

    #[test]
    fn a_cause_not_printed_is_appended() {
        let err = Outer(io::Error::new(io::ErrorKind::NotFound, "no such file"));
        assert_eq!(
            ToolError::from(err).message(),
            "reading the suite failed: no such file"
        );
    }
}

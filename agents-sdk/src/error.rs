//! Errors in the style of async-nats: one [`Error<Kind>`](Error) type, generic
//! over a per-operation `Kind` enum that callers branch on with
//! [`Error::kind`], carrying the underlying cause as its `source()`.

use std::fmt::{self, Debug, Display};
use std::time::Duration;

use schemas::{Decision, DecisionReceipt};

/// A boxed error from a layer below (NATS, JSON, I/O).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of the SDK: what went wrong (`Kind`) and, where there is one, the
/// cause from the layer below.
///
/// ```
/// use agents_sdk::{CallError, CallErrorKind};
///
/// fn explain(err: &CallError) -> String {
///     match err.kind() {
///         CallErrorKind::Denied(receipt) => format!("denied by {:?}", receipt.reasons),
///         CallErrorKind::TimedOut { after, .. } => format!("no answer after {after:?}"),
///         other => other.to_string(),
///     }
/// }
/// # let _ = explain;
/// ```
pub struct Error<Kind> {
    kind: Kind,
    source: Option<BoxError>,
}

impl<Kind> Error<Kind>
where
    Kind: Clone + Debug + Display + PartialEq,
{
    /// An error of `kind` without an underlying cause.
    pub fn new(kind: Kind) -> Self {
        Self { kind, source: None }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(kind: Kind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    /// What went wrong, to branch on.
    pub fn kind(&self) -> Kind {
        self.kind.clone()
    }

    /// What went wrong, by reference (no clone).
    pub fn kind_ref(&self) -> &Kind {
        &self.kind
    }
}

impl<Kind: Debug> Debug for Error<Kind> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl<Kind: Display> Display for Error<Kind> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {}", self.kind, source),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl<Kind: Debug + Display> std::error::Error for Error<Kind> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|boxed| boxed.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl<Kind> From<Kind> for Error<Kind>
where
    Kind: Clone + Debug + Display + PartialEq,
{
    fn from(kind: Kind) -> Self {
        Self::new(kind)
    }
}

/// The error of [`AgentBuilder::connect`](crate::AgentBuilder::connect).
pub type ConnectError = Error<ConnectErrorKind>;

/// What went wrong while connecting an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// The agent id does not match `[a-z0-9][a-z0-9_-]{0,62}`.
    #[error("agent id `{0}` is invalid: it must match `[a-z0-9][a-z0-9_-]{{0,62}}`")]
    InvalidAgentId(String),
    /// The credentials file could not be read.
    #[error("could not load the credentials file `{0}`")]
    Credentials(String),
    /// The NATS server could not be reached or refused the connection.
    #[error("could not connect to NATS at `{0}`")]
    Connect(String),
    /// The broker refused the agent's credentials (an authorization
    /// violation): the message names the key to pass.
    #[error("{}", describe_refusal(.agent, .url, .key.as_deref()))]
    Refused {
        /// The agent that tried to connect.
        agent: String,
        /// The server(s) it tried.
        url: String,
        /// The key or credentials file it presented, if one (`None`: none,
        /// or credentials set in code).
        key: Option<String>,
    },
    /// A stream or bucket of the mesh does not exist on the broker.
    #[error(
        "`{0}` not found on the broker: start the local stack (`meshctl up`) or apply the broker config"
    )]
    MissingStream(String),
    /// The broker did not answer a JetStream request.
    #[error("JetStream request failed while setting up the agent")]
    Broker,
    /// The agent's durable delivery consumer could not be created.
    #[error("could not create the delivery consumer `{0}` on `MESH_DELIVER`")]
    Consumer(String),
    /// The agent card could not be written to the `mesh-agents` bucket.
    #[error("could not publish the agent card")]
    Card,
}

/// The error of publishing a step.
pub type PublishError = Error<PublishErrorKind>;

/// What went wrong while publishing a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// `target` is not a valid agent id.
    #[error("target `{0}` is not a valid agent id")]
    InvalidTarget(String),
    /// The data could not be serialised to JSON, or is not a JSON object
    /// where a field was added.
    #[error("the step's data is not valid: {0}")]
    Data(String),
    /// The event could not be built (an attribute the CloudEvents SDK rejects).
    #[error("the event could not be built")]
    Build,
    /// The message could not be sent to the broker.
    #[error("could not publish to `{0}`")]
    Publish(String),
    /// JetStream did not acknowledge the message (no stream, or a timeout).
    #[error("`MESH_INGRESS` did not acknowledge the event on `{0}`")]
    Ack(String),
}

/// The error of a tool call or a request that waits for an answer.
pub type CallError = Error<CallErrorKind>;

/// What went wrong in a tool call or a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallErrorKind {
    /// The call could not be published.
    #[error("the call could not be published: {0}")]
    Publish(PublishErrorKind),
    /// The mesh refused the call: policy denied it, or it was invalid. The
    /// receipt carries the determining policies in `reasons`.
    #[error("{}", describe_denial(.0))]
    Denied(Box<DecisionReceipt>),
    /// Policy allowed the call but no agent serves the tool, so nothing
    /// could be routed.
    #[error(
        "no agent serves tool `{0}`: none lists it in its card in `mesh-agents` (name one with `.on(agent)`)"
    )]
    NoProvider(String),
    /// The tool answered with an error.
    #[error("tool `{tool}` failed: {message}")]
    ToolFailed {
        /// The tool.
        tool: String,
        /// The error the serving agent reported.
        message: String,
    },
    /// No answer arrived in time.
    #[error("{}", describe_timeout(.after, .decision))]
    TimedOut {
        /// How long the call waited.
        after: Duration,
        /// The mesh's decision on the call, if one arrived.
        decision: Option<Decision>,
    },
    /// The answer could not be decoded.
    #[error("the answer could not be decoded")]
    InvalidAnswer,
    /// The broker did not answer a JetStream request.
    #[error("JetStream request failed while waiting for the answer")]
    Broker,
}

/// The environment variable naming an agent's nkey seed (or credentials)
/// file, read by [`AgentBuilder::connect`](crate::AgentBuilder::connect)
/// when the builder was given no credentials.
pub const NKEY_FILE_ENV: &str = "AGENTMESH_NKEY_FILE";

/// Where `meshctl agents add <agent>` writes the agent's seed, relative to
/// the directory `meshctl up` ran in.
pub fn agent_key_path(agent: &str) -> String {
    format!(".agentmesh/auth/agents/{agent}.nk")
}

fn describe_refusal(agent: &str, url: &str, key: Option<&str>) -> String {
    let given = match key {
        Some(key) => format!("with the key in `{key}`"),
        None => "without a key file".to_owned(),
    };
    format!(
        "the broker at `{url}` refused agent `{agent}` {given} (authorization violation): \
         connect with the agent's own key, {NKEY_FILE_ENV}={} (or `--nkey-file`, \
         `AgentBuilder::nkey_file`); `meshctl agents add {agent}` registers the agent and writes it",
        agent_key_path(agent)
    )
}

fn describe_denial(receipt: &DecisionReceipt) -> String {
    let what = match receipt.subject.as_deref() {
        Some(subject) if !subject.is_empty() => {
            format!("`{}` `{subject}`", short_type(&receipt.event_type))
        }
        _ => format!("`{}`", short_type(&receipt.event_type)),
    };
    match receipt.decision {
        Decision::Invalid => format!(
            "{what} (event `{}`) was rejected as invalid: {}",
            receipt.event_id,
            receipt.errors.join("; ")
        ),
        _ => {
            let mut s = format!("{what} (event `{}`) was denied by policy", receipt.event_id);
            if !receipt.reasons.is_empty() {
                s.push_str(&format!(" (policies: {})", receipt.reasons.join(", ")));
            }
            if !receipt.errors.is_empty() {
                s.push_str(&format!(" (errors: {})", receipt.errors.join("; ")));
            }
            s
        }
    }
}

fn short_type(ty: &str) -> &str {
    ty.strip_prefix(schemas::TYPE_PREFIX).unwrap_or(ty)
}

fn describe_timeout(after: &Duration, decision: &Option<Decision>) -> String {
    match decision {
        Some(Decision::Allow) => format!("no answer within {after:?} (policy allowed the call)"),
        Some(d) => format!("no answer within {after:?} (decision: {d})"),
        None => {
            format!("no answer and no decision within {after:?}: is the policy worker running?")
        }
    }
}

impl CallError {
    /// The decision receipt when the mesh denied the call (or found it
    /// invalid), with the determining policies in `reasons`.
    pub fn denial(&self) -> Option<&DecisionReceipt> {
        match &self.kind {
            CallErrorKind::Denied(receipt) => Some(receipt),
            _ => None,
        }
    }

    /// Whether the call timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, CallErrorKind::TimedOut { .. })
    }
}

impl From<PublishError> for CallError {
    fn from(err: PublishError) -> Self {
        let kind = CallErrorKind::Publish(err.kind.clone());
        match err.source {
            Some(source) => Self::with_source(kind, source),
            None => Self::new(kind),
        }
    }
}

/// The error of [`Agent::await_decision`](crate::Agent::await_decision).
pub type DecisionError = Error<DecisionErrorKind>;

/// What went wrong while waiting for a decision receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecisionErrorKind {
    /// No receipt arrived in time.
    #[error("no decision for event `{event_id}` within {after:?}: is the policy worker running?")]
    TimedOut {
        /// The event waited for.
        event_id: String,
        /// How long it waited.
        after: Duration,
    },
    /// The broker did not answer a JetStream request.
    #[error("JetStream request failed while reading `MESH_DECISION`")]
    Broker,
}

/// The error of receiving or acknowledging deliveries.
pub type DeliveryError = Error<DeliveryErrorKind>;

/// What went wrong with a delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryErrorKind {
    /// Pulling from the agent's consumer failed (usually transient: the
    /// stream goes on).
    #[error("pulling deliveries from consumer `{0}` failed")]
    Pull(String),
    /// The acknowledgement could not be sent.
    #[error("could not acknowledge delivery `{0}`")]
    Ack(String),
    /// The report that the agent gave up on a delivery could not be
    /// published; the delivery was refused, to be reported on its next one.
    #[error("could not publish the give-up report of delivery `{0}`")]
    Report(String),
}

/// The error of the agent directory (`mesh-agents`).
pub type DirectoryError = Error<DirectoryErrorKind>;

/// What went wrong in the agent directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryErrorKind {
    /// The bucket does not exist.
    #[error(
        "KV bucket `mesh-agents` not found: start the local stack (`meshctl up`) or apply the broker config"
    )]
    MissingBucket,
    /// A card's id is not a valid agent id.
    #[error("card id `{0}` is not a valid agent id")]
    InvalidId(String),
    /// A card could not be serialised or parsed.
    #[error("agent card `{0}` is not valid JSON for an agent card")]
    Decode(String),
    /// The broker did not answer a KV request.
    #[error("KV request on `mesh-agents` failed")]
    Broker,
}

/// Why a tool failed; the caller receives the message as
/// [`CallErrorKind::ToolFailed`](crate::CallErrorKind::ToolFailed).
///
/// Any `std::error::Error` converts into it, so `?` works in handlers:
///
/// ```
/// use agents_sdk::ToolError;
///
/// fn parse(n: &str) -> Result<u32, ToolError> {
///     if n.is_empty() {
///         return Err(ToolError::new("`n` is empty"));
///     }
///     Ok(n.parse::<u32>()?)
/// }
/// assert_eq!(parse("x").unwrap_err().message(), "invalid digit found in string");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ToolError {
    message: String,
}

impl ToolError {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message the caller receives.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Debug for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ToolError").field(&self.message).finish()
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

// INVARIANT: `ToolError` does not implement `std::error::Error`, or this
// blanket conversion would overlap `From<T> for T`.
impl<E: std::error::Error> From<E> for ToolError {
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            // The SDK's `Error` and async-nats errors already print
            // `kind: source`; appending that cause again would repeat it.
            let text = cause.to_string();
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        Self { message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(decision: Decision) -> DecisionReceipt {
        DecisionReceipt {
            event_id: "e1".into(),
            trace_id: "t".into(),
            decision,
            reasons: vec!["forbid-shell".into()],
            errors: vec![],
            policy_hash: "h".into(),
            decision_id: "d".into(),
            agent: "planner".into(),
            event_type: "io.agentmesh.tool.call".into(),
            target: None,
            subject: Some("shell.exec".into()),
            causation_id: None,
            trace_derived: false,
            decided_at: String::new(),
            eval_micros: 1,
            ingress_subject: String::new(),
            ..Default::default()
        }
    }

    #[test]
    fn denial_message_names_tool_and_policies() {
        let err = CallError::new(CallErrorKind::Denied(Box::new(receipt(Decision::Deny))));
        assert_eq!(
            err.to_string(),
            "`tool.call` `shell.exec` (event `e1`) was denied by policy (policies: forbid-shell)"
        );
        assert_eq!(
            err.denial().map(|r| r.reasons.clone()),
            Some(vec!["forbid-shell".to_owned()])
        );
        assert!(!err.is_timeout());
    }

    #[test]
    fn source_is_kept_and_shown() {
        let io = std::io::Error::other("boom");
        let err = PublishError::with_source(PublishErrorKind::Ack("mesh.ingress.a.b".into()), io);
        assert_eq!(
            err.to_string(),
            "`MESH_INGRESS` did not acknowledge the event on `mesh.ingress.a.b`: boom"
        );
        assert!(std::error::Error::source(&err).is_some());
        let call: CallError = err.into();
        assert!(matches!(
            call.kind(),
            CallErrorKind::Publish(PublishErrorKind::Ack(_))
        ));
        assert!(call.to_string().ends_with(": boom"));
    }

    #[test]
    fn timeout_message_says_what_was_decided() {
        let after = Duration::from_secs(2);
        let none = CallError::new(CallErrorKind::TimedOut {
            after,
            decision: None,
        });
        assert!(none.to_string().contains("is the policy worker running"));
        let allowed = CallError::new(CallErrorKind::TimedOut {
            after,
            decision: Some(Decision::Allow),
        });
        assert_eq!(
            allowed.to_string(),
            "no answer within 2s (policy allowed the call)"
        );
        assert!(allowed.is_timeout());
    }
}

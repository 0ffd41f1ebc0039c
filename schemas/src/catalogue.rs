//! The event-type catalogue of `docs/contract.md`: `io.agentmesh.<name>`.

use std::fmt;
use std::str::FromStr;

/// The prefix every catalogue type starts with.
pub const TYPE_PREFIX: &str = "io.agentmesh.";

/// One type of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Input given to an agent.
    Prompt,
    /// An intermediate thinking step.
    Reasoning,
    /// A decision to act.
    Action,
    /// What an agent observed.
    Observation,
    /// A request to call the tool named by `subject`.
    ToolCall,
    /// The answer to a tool call.
    ToolResult,
    /// A change to an agent's memory.
    MemoryUpdate,
    /// Work handed to the `target` agent.
    TaskHandoff,
    /// A free-form message to the `target` agent.
    Message,
    /// A final result.
    Output,
}

/// The error for a type outside the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "event type `{0}` is not in the catalogue (expected `io.agentmesh.` followed by one of prompt, reasoning, action, observation, tool.call, tool.result, memory.update, task.handoff, message, output)"
)]
pub struct UnknownEventType(pub String);

impl EventType {
    /// Every catalogue type, in catalogue order.
    pub const ALL: [EventType; 10] = [
        Self::Prompt,
        Self::Reasoning,
        Self::Action,
        Self::Observation,
        Self::ToolCall,
        Self::ToolResult,
        Self::MemoryUpdate,
        Self::TaskHandoff,
        Self::Message,
        Self::Output,
    ];

    /// The full CloudEvents `type`, e.g. `io.agentmesh.tool.call`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "io.agentmesh.prompt",
            Self::Reasoning => "io.agentmesh.reasoning",
            Self::Action => "io.agentmesh.action",
            Self::Observation => "io.agentmesh.observation",
            Self::ToolCall => "io.agentmesh.tool.call",
            Self::ToolResult => "io.agentmesh.tool.result",
            Self::MemoryUpdate => "io.agentmesh.memory.update",
            Self::TaskHandoff => "io.agentmesh.task.handoff",
            Self::Message => "io.agentmesh.message",
            Self::Output => "io.agentmesh.output",
        }
    }

    /// The name without the prefix, e.g. `tool.call`.
    pub fn short_name(self) -> &'static str {
        &self.as_str()[TYPE_PREFIX.len()..]
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), t);
            assert!(t.as_str().starts_with(TYPE_PREFIX));
        }
        assert_eq!(EventType::ToolCall.short_name(), "tool.call");
        assert!("io.agentmesh.bogus".parse::<EventType>().is_err());
        assert!("prompt".parse::<EventType>().is_err());
    }
}

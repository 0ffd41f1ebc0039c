//! Rate limits and budgets as the policies see them: the counts one event
//! sees (`Tallies`, exposed to Cedar as `context.rate` and
//! `context.budget`) and counters kept in memory ([`MemoryCounters`], for
//! policy replay). The shared counters in JetStream KV are the worker's;
//! both count with the `schemas::limits` values.

use std::collections::HashMap;

use schemas::limits::{AgentTally, Usage, WorkflowTally};
use schemas::{EventType, MeshEvent};

use crate::fields::{Field, record_json};

/// What one event sees: the counts including itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tallies {
    /// This event's reported usage.
    pub usage: Usage,
    /// The agent's counters after this event.
    pub agent: AgentTally,
    /// The workflow's counters after this event.
    pub workflow: WorkflowTally,
}

impl Tallies {
    /// The `context.rate` record.
    pub(crate) fn rate_fields(&self) -> Vec<(&'static str, Field)> {
        vec![
            ("per_minute", Field::count(self.agent.per_minute)),
            ("per_hour", Field::count(self.agent.per_hour)),
            ("per_day", Field::count(self.agent.per_day)),
        ]
    }

    /// The `context.budget` record.
    pub(crate) fn budget_fields(&self) -> Vec<(&'static str, Field)> {
        vec![
            ("tokens", Field::count(self.usage.tokens)),
            ("cost_micros", Field::count(self.usage.cost_micros)),
            ("tokens_used", Field::count(self.agent.tokens_day)),
            ("cost_used_micros", Field::count(self.agent.cost_micros_day)),
            ("workflow_events", Field::count(self.workflow.events)),
            (
                "workflow_tool_calls",
                Field::count(self.workflow.tool_calls),
            ),
            ("workflow_tokens", Field::count(self.workflow.tokens)),
            (
                "workflow_cost_micros",
                Field::count(self.workflow.cost_micros),
            ),
        ]
    }

    /// The `context.rate` record as JSON.
    pub fn rate_context(&self) -> serde_json::Value {
        record_json(&self.rate_fields())
    }

    /// The `context.budget` record as JSON.
    pub fn budget_context(&self) -> serde_json::Value {
        record_json(&self.budget_fields())
    }
}

/// Counters in memory, for one process replaying recorded events in order.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    agents: HashMap<String, AgentTally>,
    workflows: HashMap<String, WorkflowTally>,
}

impl MemoryCounters {
    /// Counts `event` at `now` (seconds since the epoch) and returns what it sees.
    pub fn add(&mut self, event: &MeshEvent, now: i64) -> Tallies {
        let usage = Usage::of_event(event);
        let tool_call = event.event_type == EventType::ToolCall;
        let agent = self
            .agents
            .entry(event.agent.to_string())
            .or_default()
            .add(now, usage);
        let workflow = self
            .workflows
            .entry(event.trace.trace_id_hex())
            .or_default()
            .add(tool_call, usage);
        Tallies {
            usage,
            agent,
            workflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn context_records() {
        let t = Tallies {
            usage: Usage {
                tokens: 3,
                cost_micros: 4,
            },
            agent: AgentTally {
                per_minute: 1,
                per_hour: 2,
                per_day: 3,
                tokens_day: 30,
                cost_micros_day: 40,
                ..Default::default()
            },
            workflow: WorkflowTally {
                events: 5,
                tool_calls: 1,
                tokens: 9,
                cost_micros: 8,
            },
        };
        assert_eq!(
            t.rate_context(),
            json!({"per_minute": 1, "per_hour": 2, "per_day": 3})
        );
        assert_eq!(t.budget_context()["tokens_used"], 30);
        assert_eq!(t.budget_context()["workflow_tool_calls"], 1);
    }
}

//! The rate and budget counters on the wire: the values of the KV bucket
//! `mesh-limits` (one JSON [`AgentTally`] per agent under [`agent_key`], one
//! [`WorkflowTally`] per workflow under [`workflow_key`]) and the [`Usage`]
//! an event reports, which they add up. The policy worker keeps them and
//! exposes them to Cedar as `context.rate` and `context.budget`
//! (`docs/guardrails.md`); `meshctl limits` shows and resets them.
//!
//! Not to be confused with [`crate::Limits`], the size limit a mesh event is
//! validated against.

use serde::{Deserialize, Serialize};

use crate::{Data, MeshEvent};

/// What an event reports it consumed, from its JSON data.
///
/// `usage.total_tokens`, else `usage.input_tokens` + `usage.output_tokens`
/// (or OpenAI's `prompt_tokens` + `completion_tokens`); cost from
/// `usage.cost_usd`, counted in micro-dollars. Anything else counts as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens this event reports.
    pub tokens: u64,
    /// Cost this event reports, in millionths of a US dollar.
    pub cost_micros: u64,
}

fn number(value: Option<&serde_json::Value>) -> Option<f64> {
    value
        .and_then(serde_json::Value::as_f64)
        .filter(|n| n.is_finite() && *n >= 0.0)
}

fn saturating(n: f64) -> u64 {
    if n >= u64::MAX as f64 {
        u64::MAX
    } else {
        n.round() as u64
    }
}

impl Usage {
    /// The usage in a JSON value (its `usage` object).
    pub fn of_json(value: &serde_json::Value) -> Self {
        let Some(usage) = value.get("usage") else {
            return Self::default();
        };
        let field = |name: &str| number(usage.get(name));
        let tokens = field("total_tokens").or_else(|| {
            let input = field("input_tokens").or_else(|| field("prompt_tokens"));
            let output = field("output_tokens").or_else(|| field("completion_tokens"));
            (input.is_some() || output.is_some())
                .then(|| input.unwrap_or(0.0) + output.unwrap_or(0.0))
        });
        Self {
            tokens: tokens.map_or(0, saturating),
            cost_micros: field("cost_usd").map_or(0, |usd| saturating(usd * 1e6)),
        }
    }

    /// The usage an event's data reports.
    pub fn of_event(event: &MeshEvent) -> Self {
        #[derive(Deserialize)]
        struct Top {
            usage: Option<serde_json::Value>,
        }
        let from_bytes = |bytes: &[u8]| {
            serde_json::from_slice::<Top>(bytes)
                .ok()
                .and_then(|t| t.usage)
                .map(|usage| Self::of_json(&serde_json::json!({ "usage": usage })))
                .unwrap_or_default()
        };
        match event.event.data() {
            Some(Data::Json(value)) => Self::of_json(value),
            Some(Data::Binary(bytes)) => from_bytes(bytes),
            Some(Data::String(text)) => from_bytes(text.as_bytes()),
            None => Self::default(),
        }
    }
}

/// One agent's counters (the value of `agent.<agent>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTally {
    /// The minute (seconds since the epoch / 60) `per_minute` counts.
    pub minute: i64,
    /// Events in that minute.
    pub per_minute: u64,
    /// The hour `per_hour` counts.
    pub hour: i64,
    /// Events in that hour.
    pub per_hour: u64,
    /// The UTC day the day counters count.
    pub day: i64,
    /// Events that day.
    pub per_day: u64,
    /// Tokens reported that day.
    pub tokens_day: u64,
    /// Cost reported that day, micro-dollars.
    pub cost_micros_day: u64,
}

/// Moves a window forward when `now` is past it. A replica whose clock is
/// behind the stored window counts into the stored one, so skewed clocks
/// never make a window flap back.
fn roll(window: &mut i64, counts: &mut [&mut u64], now: i64) {
    if now > *window {
        *window = now;
        for c in counts.iter_mut() {
            **c = 0;
        }
    }
}

impl AgentTally {
    /// Counts one event at `now` (seconds since the epoch).
    pub fn add(&mut self, now: i64, usage: Usage) -> AgentTally {
        self.roll(now);
        self.per_minute += 1;
        self.per_hour += 1;
        self.per_day += 1;
        self.tokens_day = self.tokens_day.saturating_add(usage.tokens);
        self.cost_micros_day = self.cost_micros_day.saturating_add(usage.cost_micros);
        self.clone()
    }

    /// The counters as they stand at `now` (windows rolled, nothing added).
    pub fn at(&self, now: i64) -> AgentTally {
        let mut t = self.clone();
        t.roll(now);
        t
    }

    fn roll(&mut self, now: i64) {
        roll(
            &mut self.minute,
            &mut [&mut self.per_minute],
            now.div_euclid(60),
        );
        roll(
            &mut self.hour,
            &mut [&mut self.per_hour],
            now.div_euclid(3600),
        );
        roll(
            &mut self.day,
            &mut [
                &mut self.per_day,
                &mut self.tokens_day,
                &mut self.cost_micros_day,
            ],
            now.div_euclid(86_400),
        );
    }
}

/// One workflow's counters (the value of `workflow.<trace id>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowTally {
    /// Events in the workflow.
    pub events: u64,
    /// `tool.call` events in the workflow.
    pub tool_calls: u64,
    /// Tokens reported in the workflow.
    pub tokens: u64,
    /// Cost reported in the workflow, micro-dollars.
    pub cost_micros: u64,
}

impl WorkflowTally {
    /// Counts one event.
    pub fn add(&mut self, tool_call: bool, usage: Usage) -> WorkflowTally {
        self.events += 1;
        self.tool_calls += u64::from(tool_call);
        self.tokens = self.tokens.saturating_add(usage.tokens);
        self.cost_micros = self.cost_micros.saturating_add(usage.cost_micros);
        *self
    }
}

/// The key of an agent's counters.
pub fn agent_key(agent: &str) -> String {
    format!("agent.{agent}")
}

/// The key of a workflow's counters.
pub fn workflow_key(trace_id: &str) -> String {
    format!("workflow.{trace_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_fields() {
        assert_eq!(
            Usage::of_json(&json!({"usage": {"total_tokens": 1500, "cost_usd": 0.0123}})),
            Usage {
                tokens: 1500,
                cost_micros: 12_300
            }
        );
        assert_eq!(
            Usage::of_json(&json!({"usage": {"input_tokens": 1000, "output_tokens": 200}})).tokens,
            1200
        );
        assert_eq!(
            Usage::of_json(&json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})).tokens,
            15
        );
        for nothing in [
            json!({"tokens": 5}),
            json!({"usage": {"total_tokens": "many"}}),
            json!({"usage": {"total_tokens": -4}}),
            json!([1, 2]),
        ] {
            assert_eq!(Usage::of_json(&nothing), Usage::default(), "{nothing}");
        }
    }

    #[test]
    fn windows_roll_at_clock_boundaries() {
        let t0 = 1_770_000_000 - 1_770_000_000 % 86_400; // 00:00:00 UTC
        let mut a = AgentTally::default();
        let u = Usage {
            tokens: 100,
            cost_micros: 5,
        };
        for s in 0..3 {
            a.add(t0 + s, u);
        }
        let seen = a.add(t0 + 59, u);
        assert_eq!(
            (
                seen.per_minute,
                seen.per_hour,
                seen.per_day,
                seen.tokens_day
            ),
            (4, 4, 4, 400)
        );
        // Next minute: the minute count starts again, the others go on.
        let seen = a.add(t0 + 60, u);
        assert_eq!((seen.per_minute, seen.per_hour, seen.per_day), (1, 5, 5));
        // Next hour.
        let seen = a.add(t0 + 3600, u);
        assert_eq!((seen.per_minute, seen.per_hour, seen.per_day), (1, 1, 6));
        // Next day: tokens and cost too.
        let seen = a.add(t0 + 86_400, u);
        assert_eq!(
            (
                seen.per_minute,
                seen.per_hour,
                seen.per_day,
                seen.tokens_day,
                seen.cost_micros_day
            ),
            (1, 1, 1, 100, 5)
        );
        // A replica with a clock a minute behind counts into the current window.
        let seen = a.add(t0 + 86_400 - 60, u);
        assert_eq!((seen.per_minute, seen.per_day), (2, 2));
        // Reading later rolls without counting.
        assert_eq!(a.at(t0 + 2 * 86_400).per_day, 0);
    }

    #[test]
    fn workflow_counts() {
        let mut w = WorkflowTally::default();
        w.add(false, Usage::default());
        let seen = w.add(
            true,
            Usage {
                tokens: 7,
                cost_micros: 1,
            },
        );
        assert_eq!(
            seen,
            WorkflowTally {
                events: 2,
                tool_calls: 1,
                tokens: 7,
                cost_micros: 1
            }
        );
    }

    #[test]
    fn keys_and_values_on_the_wire() {
        assert_eq!(agent_key("coder"), "agent.coder");
        assert_eq!(workflow_key("4bf9"), "workflow.4bf9");
        let tally: AgentTally = serde_json::from_value(json!({
            "minute": 1, "per_minute": 2, "hour": 3, "per_hour": 4, "day": 5,
            "per_day": 6, "tokens_day": 7, "cost_micros_day": 8
        }))
        .unwrap();
        assert_eq!((tally.per_minute, tally.cost_micros_day), (2, 8));
        let workflow = WorkflowTally {
            events: 1,
            tool_calls: 1,
            tokens: 2,
            cost_micros: 3,
        };
        assert_eq!(
            serde_json::to_value(workflow).unwrap(),
            json!({"events": 1, "tool_calls": 1, "tokens": 2, "cost_micros": 3})
        );
    }
}

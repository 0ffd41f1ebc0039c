//! Workflow labels on the wire: the value of the KV bucket `mesh-flows`
//! (one JSON [`FlowRecord`] per workflow, key = trace id), which the policy
//! worker reads before deciding an event of the workflow and updates with
//! compare-and-set when an allowed event adds a label or a step
//! (`docs/guardrails.md`, "Workflow labels").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a workflow picked one label up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelOrigin {
    /// The event that added it, `<agent>/<event id>`.
    pub event: String,
    /// The decision that allowed that event.
    pub decision_id: String,
}

/// One workflow's labels and steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Each label the workflow holds, with where it was added.
    #[serde(default)]
    pub labels: BTreeMap<String, LabelOrigin>,
    /// Allowed events of the workflow so far.
    #[serde(default)]
    pub steps: u64,
    /// Whether the record was lost (purged or deleted) and written again:
    /// the workflow then holds every declared label for good (fail closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

/// The key of a workflow's record: its trace id (32 lowercase hex
/// characters, valid as a KV key).
pub fn key(trace_id_hex: &str) -> &str {
    trace_id_hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_an_empty_object() {
        let mut record = FlowRecord {
            steps: 3,
            ..Default::default()
        };
        record.labels.insert(
            "private".into(),
            LabelOrigin {
                event: "coder/e1".into(),
                decision_id: "d1".into(),
            },
        );
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(
            text,
            r#"{"labels":{"private":{"event":"coder/e1","decision_id":"d1"}},"steps":3}"#
        );
        assert_eq!(serde_json::from_str::<FlowRecord>(&text).unwrap(), record);
        assert_eq!(
            serde_json::from_str::<FlowRecord>("{}").unwrap(),
            FlowRecord::default()
        );
    }
}

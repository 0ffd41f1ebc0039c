//! The mixed load the fault runs publish (`mesh-bench faults` and the
//! fault tests in `tests/`): one event generator, so they count allowed,
//! denied and invalid events the same way.

use async_nats::HeaderMap;
use schemas::subjects;

/// Event `i` of run `run`: of every 10, 8 handoffs the shipped policies
/// allow, 1 denied `shell.exec` call, 1 invalid (the source does not match
/// the subject). Returns its subject, headers and data.
pub fn event(run: &str, i: u64) -> (String, HeaderMap, String) {
    let id = format!("{run}-{i}");
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id.as_str());
    h.insert("Nats-Msg-Id", id.as_str());
    h.insert("ce-datacontenttype", "application/json");
    let subject = match i % 10 {
        0 => {
            h.insert("ce-source", "/agents/coder");
            h.insert("ce-type", "io.agentmesh.tool.call");
            h.insert("ce-subject", "shell.exec");
            subjects::ingress("coder", "tool_call")
        }
        1 => {
            h.insert("ce-source", "/agents/coder");
            h.insert("ce-type", "io.agentmesh.task.handoff");
            subjects::ingress("planner", "handoff")
        }
        _ => {
            h.insert("ce-source", "/agents/planner");
            h.insert("ce-type", "io.agentmesh.task.handoff");
            h.insert("ce-target", "coder");
            subjects::ingress("planner", "handoff")
        }
    };
    (subject, h, format!("{{\"i\":{i}}}"))
}

/// The index `i` of an [`event`] id (`<run>-<i>`).
pub fn index_of(id: &str) -> Option<u64> {
    id.rsplit_once('-')?.1.parse().ok()
}

/// How many of the first `n` [`event`]s the shipped policies allow (all
/// but the denied calls `0, 10, 20, …` and the invalid events `1, 11, …`).
pub fn allowed(n: u64) -> u64 {
    n - n.div_ceil(10) - (n + 8) / 10
}

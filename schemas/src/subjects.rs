//! Subject and stream names of `docs/contract.md` (contract).

/// Stream of every ingress event: `mesh.ingress.>`.
pub const STREAM_INGRESS: &str = "MESH_INGRESS";
/// Stream of approved, routed events: `mesh.deliver.>`.
pub const STREAM_DELIVER: &str = "MESH_DELIVER";
/// Stream of decision receipts: `mesh.decision.>`.
pub const STREAM_DECISION: &str = "MESH_DECISION";
/// Stream of denied and invalid events: `mesh.dead.>`.
pub const STREAM_DEAD: &str = "MESH_DEAD";
/// Stream of GPU lease events: `mesh.gpu.lease.>`.
pub const STREAM_GPU: &str = "MESH_GPU";
/// Stream of approved tool calls, by target and source: `mesh.call.>`. A
/// tool call is stored here as well as on `mesh.deliver.<target>.<source>`,
/// so a serving agent reads calls from a consumer of their own, never
/// queued behind its other deliveries.
pub const STREAM_CALL: &str = "MESH_CALL";
/// KV bucket of agent cards, key = agent id.
pub const BUCKET_AGENTS: &str = "mesh-agents";
/// KV bucket of GPU leases, one key per leased GPU.
pub const BUCKET_GPU_LEASES: &str = "mesh-gpu-leases";
/// Stream of events parked for human approval and the answers to them:
/// `mesh.approval.>`.
pub const STREAM_APPROVALS: &str = "MESH_APPROVALS";
/// KV bucket of rate and budget counters (`agent.<agent>`, `workflow.<trace id>`).
pub const BUCKET_LIMITS: &str = "mesh-limits";
/// KV bucket of approval requests and their state, key = approval id.
pub const BUCKET_APPROVALS: &str = "mesh-approvals";
/// KV bucket of the tool-result cache (`docs/cache.md`): results
/// (`r.<tool hash>.<key hash>`), calls waiting for their result
/// (`p.<call hash>`) and calls in flight (`f.<key hash>`).
pub const BUCKET_TOOL_CACHE: &str = "mesh-tool-cache";

/// KV bucket of the trusted decision signers (`docs/contract.md`, "Signed
/// decisions"), key = public key, value = [`crate::signing::SignerRecord`]
/// JSON. Every agent reads it; only the operator writes it.
pub const BUCKET_SIGNERS: &str = "mesh-signers";
/// Stream of signed audit checkpoints over `MESH_DECISION`:
/// `mesh.audit.checkpoint.>`.
pub const STREAM_AUDIT: &str = "MESH_AUDIT";
/// Filter of every audit checkpoint: `mesh.audit.checkpoint.>`.
pub const AUDIT_CHECKPOINTS: &str = "mesh.audit.checkpoint.>";
/// The audit sink's durable on `MESH_DECISION` that feeds its checkpoints.
pub const DURABLE_AUDIT_CHAIN: &str = "audit-chain";

/// Subject of one signer's audit checkpoints: `mesh.audit.checkpoint.<signer>`.
pub fn audit_checkpoint(signer: &str) -> String {
    format!("mesh.audit.checkpoint.{signer}")
}

/// Subject an agent publishes a step on: `mesh.ingress.<agent>.<step>`.
pub fn ingress(agent: &str, step: &str) -> String {
    format!("mesh.ingress.{agent}.{step}")
}

/// Subject of an approved event for `target`: `mesh.deliver.<target>.<source>`.
pub fn deliver(target: &str, source: &str) -> String {
    format!("mesh.deliver.{target}.{source}")
}

/// Subject of an approved `tool.call` for `target`, alongside its delivery:
/// `mesh.call.<target>.<source>`.
pub fn call(target: &str, source: &str) -> String {
    format!("mesh.call.{target}.{source}")
}

/// Subject of the decision receipts for `source`: `mesh.decision.<source>`.
pub fn decision(source: &str) -> String {
    format!("mesh.decision.{source}")
}

/// Subject of dead letters from `source`: `mesh.dead.<source>`.
pub fn dead(source: &str) -> String {
    format!("mesh.dead.{source}")
}

/// Subject of GPU lease events for `pool`: `mesh.gpu.lease.<pool>`.
pub fn gpu_lease(pool: &str) -> String {
    format!("mesh.gpu.lease.{pool}")
}

/// Subject of an event parked for approval:
/// `mesh.approval.request.<source>.<approval id>`.
pub fn approval_request(source: &str, approval_id: &str) -> String {
    format!("mesh.approval.request.{source}.{approval_id}")
}

/// Subject of an answer (approve, reject, expire) to a parked event:
/// `mesh.approval.answer.<source>.<approval id>`.
pub fn approval_answer(source: &str, approval_id: &str) -> String {
    format!("mesh.approval.answer.{source}.{approval_id}")
}

/// Filter of every approval answer: `mesh.approval.answer.>`.
pub const APPROVAL_ANSWERS: &str = "mesh.approval.answer.>";

/// The `Nats-Msg-Id` of every publish the policy worker makes for one
/// event (receipt, delivery or dead letter, approval copies): `<agent>/<id>`.
/// An event is identified by its source and id, so two agents' events with
/// the same id never collapse, and the same agent's re-publish of one event
/// lands once. Agent ids contain no `/`, so the key is unambiguous.
pub fn event_key(agent: &str, event_id: &str) -> String {
    format!("{agent}/{event_id}")
}

/// The parts of an ingress subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngressSubject<'a> {
    /// The agent token (not yet validated as an agent id).
    pub agent: &'a str,
    /// The step token(s) after the agent; empty when the subject has none.
    pub step: &'a str,
}

/// Splits `mesh.ingress.<agent>.<step...>`; `None` for any other subject.
pub fn parse_ingress(subject: &str) -> Option<IngressSubject<'_>> {
    let rest = subject.strip_prefix("mesh.ingress.")?;
    let (agent, step) = rest.split_once('.').unwrap_or((rest, ""));
    (!agent.is_empty()).then_some(IngressSubject { agent, step })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_parts() {
        assert_eq!(
            parse_ingress("mesh.ingress.coder.tool_call"),
            Some(IngressSubject {
                agent: "coder",
                step: "tool_call"
            })
        );
        assert_eq!(
            parse_ingress("mesh.ingress.coder"),
            Some(IngressSubject {
                agent: "coder",
                step: ""
            })
        );
        assert_eq!(parse_ingress("mesh.deliver.coder.x"), None);
        assert_eq!(deliver("coder", "planner"), "mesh.deliver.coder.planner");
        assert_eq!(call("coder", "planner"), "mesh.call.coder.planner");
    }
}

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
/// KV bucket of workflow labels (`docs/guardrails.md`, "Workflow labels"),
/// key = trace id, value = [`crate::flows::FlowRecord`] JSON. Only the
/// policy worker reads and writes it.
pub const BUCKET_FLOWS: &str = "mesh-flows";

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

/// Filter of every ingress event (the `MESH_INGRESS` stream): `mesh.ingress.>`.
pub const INGRESS_ALL: &str = "mesh.ingress.>";
/// Filter of every delivery (the `MESH_DELIVER` stream): `mesh.deliver.>`.
pub const DELIVER_ALL: &str = "mesh.deliver.>";
/// Filter of every tool call (the `MESH_CALL` stream): `mesh.call.>`.
pub const CALL_ALL: &str = "mesh.call.>";
/// Filter of every receipt (the `MESH_DECISION` stream): `mesh.decision.>`.
pub const DECISION_ALL: &str = "mesh.decision.>";
/// Filter of every dead letter (the `MESH_DEAD` stream): `mesh.dead.>`.
pub const DEAD_ALL: &str = "mesh.dead.>";
/// Filter of every GPU lease event (the `MESH_GPU` stream): `mesh.gpu.lease.>`.
pub const GPU_LEASE_ALL: &str = "mesh.gpu.lease.>";
/// Filter of every approval request and answer (the `MESH_APPROVALS`
/// stream): `mesh.approval.>`.
pub const APPROVAL_ALL: &str = "mesh.approval.>";
/// Core subject the GPU scaler publishes its pool status on (request-reply
/// and periodic): `mesh.gpu.status`.
pub const GPU_STATUS: &str = "mesh.gpu.status";

/// Filter of everything one agent may publish: `mesh.ingress.<agent>.>`.
pub fn ingress_of(agent: &str) -> String {
    format!("mesh.ingress.{agent}.>")
}

/// Filter of one agent's deliveries: `mesh.deliver.<agent>.>`.
pub fn deliveries_to(agent: &str) -> String {
    format!("mesh.deliver.{agent}.>")
}

/// Filter of the tool calls one agent serves: `mesh.call.<agent>.>`.
pub fn calls_to(agent: &str) -> String {
    format!("mesh.call.{agent}.>")
}

/// Name of an agent's durable consumer, on `MESH_DELIVER` (its deliveries)
/// and on `MESH_CALL` (the tool calls it serves): `agent-<id>`.
pub fn agent_consumer(agent: &str) -> String {
    format!("agent-{agent}")
}

/// Name of an agent's durable consumer of its decision receipts on
/// `MESH_DECISION` (filtered to [`decision`]): `receipts-<id>`.
pub fn receipts_consumer(agent: &str) -> String {
    format!("receipts-{agent}")
}

/// The agent a durable consumer named by [`agent_consumer`] belongs to.
pub fn agent_of_consumer(consumer: &str) -> Option<&str> {
    consumer
        .strip_prefix("agent-")
        .filter(|agent| !agent.is_empty())
}

/// The parts of a delivery or tool-call subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedSubject<'a> {
    /// The agent the event was routed to.
    pub target: &'a str,
    /// The agent that published it.
    pub source: &'a str,
}

/// Splits `mesh.deliver.<target>.<source>` or `mesh.call.<target>.<source>`;
/// `None` for any other subject or when a token is missing or empty.
pub fn parse_routed(subject: &str) -> Option<RoutedSubject<'_>> {
    let rest = subject
        .strip_prefix("mesh.deliver.")
        .or_else(|| subject.strip_prefix("mesh.call."))?;
    let mut tokens = rest.split('.');
    let (target, source) = (tokens.next()?, tokens.next()?);
    (!target.is_empty() && !source.is_empty()).then_some(RoutedSubject { target, source })
}

/// The agent of a receipt subject `mesh.decision.<agent>`.
pub fn parse_decision(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("mesh.decision.")
        .filter(|agent| !agent.is_empty())
}

/// The pool of a GPU lease subject `mesh.gpu.lease.<pool>`.
pub fn parse_gpu_lease(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("mesh.gpu.lease.")
        .filter(|pool| !pool.is_empty())
}

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

    #[test]
    fn routed_and_other_parts() {
        let routed = RoutedSubject {
            target: "coder",
            source: "planner",
        };
        assert_eq!(parse_routed(&deliver("coder", "planner")), Some(routed));
        assert_eq!(parse_routed(&call("coder", "planner")), Some(routed));
        assert_eq!(parse_routed("mesh.deliver.coder"), None);
        assert_eq!(parse_routed("mesh.deliver.coder."), None);
        assert_eq!(parse_routed("mesh.ingress.coder.x"), None);
        assert_eq!(parse_decision(&decision("coder")), Some("coder"));
        assert_eq!(parse_decision("mesh.decision."), None);
        assert_eq!(parse_gpu_lease(&gpu_lease("a100")), Some("a100"));
        assert_eq!(agent_of_consumer(&agent_consumer("coder")), Some("coder"));
        assert_eq!(agent_of_consumer("inbox"), None);
        assert_eq!(deliveries_to("coder"), "mesh.deliver.coder.>");
        assert_eq!(calls_to("coder"), "mesh.call.coder.>");
        assert_eq!(ingress_of("coder"), "mesh.ingress.coder.>");
    }
}

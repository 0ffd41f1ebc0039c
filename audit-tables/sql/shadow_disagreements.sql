-- Events in [{from:DateTime}, {to:DateTime}) that the shadow policy set
-- decides differently from the active one, newest first: what a policy
-- change would do before it is enforced (`meshctl policy promote`).
-- Receipts decided without a shadow set (shadow_decision = '') are left out.
-- Run in database agentmesh; see docs/guardrails.md and docs/audit.md.
SELECT
    time,
    agent,
    type,
    target,
    subject,
    decision,
    reasons,
    shadow_decision,
    shadow_reasons,
    policy_hash,
    shadow_policy_hash,
    event_id,
    trace_id
FROM decisions FINAL
WHERE shadow_decision != ''
    AND shadow_decision != decision
    AND time >= {from:DateTime} AND time < {to:DateTime}
ORDER BY time_us DESC, event_id

-- Decisions in [{from:DateTime}, {to:DateTime}) that waited for a human:
-- approved (decision allow) or rejected by whom, or expired (decision deny),
-- oldest first. Run in database agentmesh; see docs/guardrails.md.
SELECT
    time,
    agent,
    type,
    target,
    subject,
    approval_status,
    approver,
    approval_comment,
    decision,
    reasons,
    approval_id,
    event_id,
    trace_id
FROM decisions FINAL
WHERE approval_status != ''
    AND time >= {from:DateTime} AND time < {to:DateTime}
ORDER BY time_us, event_id

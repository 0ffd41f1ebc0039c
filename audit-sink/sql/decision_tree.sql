-- The decision tree of one workflow: every step of trace {trace_id:String}
-- with its parent step (causationid) and the policy decision on it, oldest
-- first. parent_id = '' marks a root; decision = '' means no receipt yet.
-- Run in database agentmesh; see docs/audit.md for the parameter syntax.
SELECT
    event_id,
    parent_id,
    agent,
    type,
    target,
    subject,
    time,
    time_us,
    decision,
    reasons,
    errors,
    policy_hash,
    valid,
    error
FROM
(
    SELECT event_id, parent_id, agent, type, target, subject, time, time_us, valid, error
    FROM events FINAL
    WHERE trace_id = {trace_id:String}
) AS e
ANY LEFT JOIN
(
    SELECT event_id, decision, reasons, errors, policy_hash
    FROM decisions FINAL
    WHERE event_id IN (SELECT event_id FROM events WHERE trace_id = {trace_id:String})
) AS d USING event_id
ORDER BY time_us, event_id

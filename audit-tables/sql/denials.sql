-- Every denial in [{from:DateTime}, {to:DateTime}), one row per denial and
-- determining policy, grouped by agent and policy. A denial without a policy
-- id was an evaluation error (fail closed); its errors column says which.
-- Run in database agentmesh; see docs/audit.md for the parameter syntax.
SELECT
    agent,
    policy,
    time,
    event_id,
    trace_id,
    type,
    target,
    subject,
    errors
FROM
(
    SELECT agent, reasons, errors, time, time_us, event_id, trace_id, type, target, subject
    FROM decisions FINAL
    WHERE decision = 'deny' AND time >= {from:DateTime} AND time < {to:DateTime}
)
ARRAY JOIN if(empty(reasons), ['(evaluation error)'], reasons) AS policy
ORDER BY agent, policy, time_us, event_id

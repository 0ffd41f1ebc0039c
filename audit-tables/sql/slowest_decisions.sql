-- The slowest policy decisions in [{from:DateTime}, {to:DateTime}): the
-- {limit:UInt32} longest evaluations, slowest first.
-- Run in database agentmesh; see docs/audit.md for the parameter syntax.
SELECT
    eval_micros,
    time,
    decision,
    agent,
    type,
    target,
    subject,
    event_id,
    trace_id,
    policy_hash
FROM decisions FINAL
WHERE time >= {from:DateTime} AND time < {to:DateTime}
ORDER BY eval_micros DESC, time_us, event_id
LIMIT {limit:UInt32}

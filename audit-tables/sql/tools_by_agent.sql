-- Which tools each agent called in [{from:DateTime}, {to:DateTime}): calls
-- per agent and tool (the tool is the subject of an io.agentmesh.tool.call),
-- with how many the policy allowed, denied or found invalid, and how many
-- have no decision yet. Events and decisions match on agent + event_id.
-- Run in database agentmesh; see docs/audit.md for the parameter syntax.
SELECT
    agent,
    tool,
    count() AS calls,
    countIf(decision = 'allow') AS allowed,
    countIf(decision = 'deny') AS denied,
    countIf(decision = 'invalid') AS invalid,
    countIf(decision = '') AS undecided,
    min(time) AS first_call,
    max(time) AS last_call
FROM
(
    SELECT event_id, agent, subject AS tool, time
    FROM events FINAL
    WHERE type = 'io.agentmesh.tool.call' AND time >= {from:DateTime} AND time < {to:DateTime}
) AS e
ANY LEFT JOIN
(
    SELECT agent, event_id, decision
    FROM decisions FINAL
    WHERE (agent, event_id) IN
    (
        SELECT agent, event_id FROM events
        WHERE type = 'io.agentmesh.tool.call' AND time >= {from:DateTime} AND time < {to:DateTime}
    )
) AS d USING (agent, event_id)
GROUP BY agent, tool
ORDER BY agent, calls DESC, tool

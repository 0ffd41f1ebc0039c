-- The decision tree of one workflow: every step of trace {trace_id:String}
-- with its parent step and the policy decision on it, oldest first.
-- A step is identified by agent + event_id (two agents may use the same id);
-- its parent is (parent_agent, parent_id). parent_id = '' marks a root;
-- decision = '' means no receipt yet. parent_agent is the event's
-- causationsource when it had one; else the agent of the step of this trace
-- with id parent_id (when several agents used that id: the one whose target
-- is this step's agent, else the latest one before this step); '' when no
-- step of this trace has that id. cache is what the tool-result cache did
-- for the step ('' when not asked; 'hit' means the worker answered the
-- call from the cache), cache_source the call that first produced the
-- cached result (docs/cache.md). labels_added are the workflow labels the
-- step added (where the workflow picked each up), redacted the detector
-- kinds its redacted delivery replaced (docs/guardrails.md).
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
    error,
    parent_agent,
    cache,
    cache_source,
    labels_added,
    redacted
FROM
(
    SELECT
        event_id, parent_id, agent, type, target, subject, time, time_us, valid, error,
        decision, reasons, errors, policy_hash, cache, cache_source, labels_added, redacted
    FROM
    (
        SELECT event_id, parent_id, agent, type, target, subject, time, time_us, valid, error
        FROM events FINAL
        WHERE trace_id = {trace_id:String}
    ) AS e
    ANY LEFT JOIN
    (
        SELECT agent, event_id, decision, reasons, errors, policy_hash, cache, cache_source, labels_added, redacted
        FROM decisions FINAL
        WHERE (agent, event_id) IN (SELECT agent, event_id FROM events WHERE trace_id = {trace_id:String})
    ) AS d USING (agent, event_id)
) AS s
ANY LEFT JOIN
(
    SELECT
        agent,
        event_id,
        if(any(declared) != '', any(declared), argMax(candidate, (
            candidate_target = agent,
            candidate_us < time_us,
            if(candidate_us < time_us, toInt64(candidate_us), -toInt64(candidate_us))
        ))) AS parent_agent
    FROM
    (
        SELECT agent, event_id, declared, time_us, candidate, candidate_target, candidate_us
        FROM
        (
            SELECT agent, event_id, parent_id, parent_agent AS declared, time_us
            FROM events FINAL
            WHERE trace_id = {trace_id:String} AND parent_id != ''
        ) AS child
        ALL LEFT JOIN
        (
            SELECT event_id AS parent_id, agent AS candidate, target AS candidate_target, time_us AS candidate_us
            FROM events FINAL
            WHERE trace_id = {trace_id:String}
        ) AS parent USING parent_id
    )
    GROUP BY agent, event_id
) AS p USING (agent, event_id)
ORDER BY time_us, event_id, agent

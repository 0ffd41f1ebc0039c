//! The guardrails on a broker with authorization: the policy worker, with
//! its own key and only the permissions its role template grants, keeps
//! rate counters in `mesh-limits` (compare-and-set), parks an event for
//! approval, applies an answer the operator sends, and expires an
//! unanswered request — all with agents publishing under their own keys.

use async_nats::jetstream;
use broker_config::auth::{ADMIN, POLICY_WORKER};
use e2e::{SecureNats, WAIT};
use schemas::{ApprovalStatus, Decision, EventBuilder, EventBuilderV10, subjects};
use serde_json::json;
use testkit::{eventually, receipt};
use tokio_util::sync::CancellationToken;

/// The shipped policies plus a small rate limit on the reviewer.
fn policies() -> anyhow::Result<tempfile::TempDir> {
    let dir = testkit::policies_copy()?;
    std::fs::write(
        dir.path().join("limits.cedar"),
        "@id(\"reviewer-hourly\")\nforbid (principal == Agent::\"reviewer\", action, resource) when { context.rate.per_hour > 2 };\n",
    )?;
    Ok(dir)
}

async fn publish(
    js: &jetstream::Context,
    agent: &str,
    step: &str,
    event: schemas::Event,
) -> anyhow::Result<()> {
    let (headers, payload) = schemas::encode_binary(&event);
    js.publish_with_headers(subjects::ingress(agent, step), headers, payload)
        .await?
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_approvals_work_under_the_worker_role_template() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "coder", "reviewer"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let policies = policies()?;
    let tmp = tempfile::tempdir()?;
    let ready = tmp.path().join("worker.ready");
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(policy_worker::run(
        policy_worker::Config {
            nats: broker_config::NatsArgs {
                url: mesh.url(),
                credentials: broker_config::NatsCredentials {
                    nkey_seed_file: Some(mesh.seed_file(POLICY_WORKER)?),
                    creds_file: None,
                },
            },
            policies: policies.path().to_owned(),
            watch_policies: false,
            ready_file: Some(ready.clone()),
            approval_timeout_secs: 4,
            signing_key: Some(mesh.trusted_signing_key().await?),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    eventually(WAIT, "the policy worker to become ready", || async {
        (ready.exists() || worker.is_finished()).then_some(())
    })
    .await?;
    anyhow::ensure!(!worker.is_finished(), "the policy worker stopped at start");

    // Counters: the reviewer's third event this hour is denied.
    let reviewer = mesh.jetstream("reviewer").await?;
    for i in 1..=3 {
        let event = EventBuilderV10::new()
            .id(format!("r{i}"))
            .source("/agents/reviewer")
            .ty("io.agentmesh.reasoning")
            .data("application/json", json!({"n": i}))
            .build()?;
        publish(&reviewer, "reviewer", "reasoning", event).await?;
    }
    let mut decisions = Vec::new();
    for i in 1..=3 {
        decisions.push(receipt(&admin, &format!("r{i}")).await?.decision);
    }
    decisions.sort_by_key(|d| d.as_str());
    assert_eq!(
        decisions,
        vec![Decision::Allow, Decision::Allow, Decision::Deny]
    );
    let limits = admin.get_key_value(subjects::BUCKET_LIMITS).await?;
    let tally: schemas::limits::AgentTally = serde_json::from_slice(
        &limits
            .get(schemas::limits::agent_key("reviewer"))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no counters for the reviewer"))?,
    )?;
    assert_eq!(tally.per_hour, 3);

    // Approvals: one released by the operator, one left to expire.
    let coder = mesh.jetstream("coder").await?;
    for id in ["d-approved", "d-expired"] {
        let event = EventBuilderV10::new()
            .id(id)
            .source("/agents/coder")
            .ty("io.agentmesh.tool.call")
            .subject("deploy.prod")
            .data("application/json", json!({"service": id}))
            .build()?;
        publish(&coder, "coder", "tool_call", event).await?;
    }
    let approvals = admin.get_key_value(subjects::BUCKET_APPROVALS).await?;
    let approved_id = schemas::approval::approval_id("coder", "d-approved");
    eventually(WAIT, "the parked deploy", || async {
        approvals.get(&approved_id).await.ok()?.map(|_| ())
    })
    .await?;
    broker_config::admin::send_answer(
        &admin,
        "coder",
        &schemas::approval::Answer {
            id: approved_id.clone(),
            action: schemas::approval::AnswerAction::Approve,
            approver: "alice".into(),
            comment: String::new(),
            at: String::new(),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let approved = receipt(&admin, "d-approved").await?;
    assert_eq!(approved.decision, Decision::Allow);
    assert_eq!(
        approved.approval.map(|a| (a.status, a.approver)),
        Some((ApprovalStatus::Approved, "alice".to_owned()))
    );
    let expired = receipt(&admin, "d-expired").await?;
    assert_eq!(expired.decision, Decision::Deny);
    assert_eq!(
        expired.approval.map(|a| a.status),
        Some(ApprovalStatus::Expired)
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, worker).await???;
    Ok(())
}

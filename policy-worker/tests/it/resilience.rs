//! The worker crashing mid-stream, and policies changing under it.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::support;

use std::collections::HashSet;

use schemas::{Decision, EventBuilder, subjects};
use support::*;

#[tokio::test]
async fn killed_mid_stream_and_restarted_loses_nothing_and_delivers_once() {
    const EVENTS: usize = 3000;
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let mut worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    // Publish without waiting for each ack, so the stream fills while the
    // worker is busy; half allowed handoffs, half denied tool calls.
    let mut acks = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let event = if i % 2 == 0 {
            handoff(&format!("ev-{i}"))
        } else {
            event(&format!("ev-{i}"), "coder", "tool.call")
                .subject("shell.exec")
                .build()
                .unwrap()
        };
        let (headers, payload) = schemas::encode_binary(&event);
        acks.push(
            mesh.js
                .publish_with_headers(
                    "mesh.ingress.x.y".replace("x", if i % 2 == 0 { "planner" } else { "coder" }),
                    headers,
                    payload,
                )
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }

    // Crash it once some, but not all, events are decided.
    testkit::eventually(WAIT, "the first receipts", || async {
        (mesh.count(subjects::STREAM_DECISION).await.unwrap() >= 200).then_some(())
    })
    .await
    .unwrap();
    worker.kill();
    let decided_before = mesh.count(subjects::STREAM_DECISION).await.unwrap();
    assert!(
        decided_before < EVENTS as u64,
        "the worker finished before it could be killed; raise EVENTS"
    );

    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;
    mesh.wait_messages(subjects::STREAM_DECISION, EVENTS as u64)
        .await
        .unwrap();
    mesh.wait_messages(subjects::STREAM_DELIVER, (EVENTS / 2) as u64)
        .await
        .unwrap();
    mesh.wait_messages(subjects::STREAM_DEAD, (EVENTS / 2) as u64)
        .await
        .unwrap();

    let receipts = mesh.receipts().await.unwrap();
    let ids: HashSet<_> = receipts.iter().map(|r| r.event_id.clone()).collect();
    assert_eq!(
        receipts.len(),
        EVENTS,
        "one receipt per event (decided before the kill: {decided_before})"
    );
    assert_eq!(ids.len(), EVENTS);
    let delivered = mesh.messages(subjects::STREAM_DELIVER).await.unwrap();
    let delivered_ids: HashSet<_> = delivered
        .iter()
        .map(|m| header(&m.headers, "ce-id").unwrap())
        .collect();
    assert_eq!(delivered.len(), EVENTS / 2, "no duplicate deliveries");
    assert_eq!(delivered_ids.len(), EVENTS / 2);
    assert_eq!(
        mesh.count(subjects::STREAM_DEAD).await.unwrap(),
        (EVENTS / 2) as u64
    );
}

#[tokio::test]
async fn hot_reload_swaps_a_valid_set_and_keeps_the_old_on_an_invalid_one() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let mut worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    mesh.publish_event("mesh.ingress.coder.tool_call", &code_search("before"))
        .await
        .unwrap();
    let before = mesh.receipt("before").await.unwrap();
    assert_eq!(before.decision, Decision::Allow);

    // A valid change: forbid code.search. Receipts switch to the new hash.
    std::fs::write(policies.path().join("extra.cedar"), FORBID_CODE_SEARCH).unwrap();
    worker.wait_for_log("Policies reloaded.").await;
    mesh.publish_event("mesh.ingress.coder.tool_call", &code_search("after-valid"))
        .await
        .unwrap();
    let after = mesh.receipt("after-valid").await.unwrap();
    assert_eq!(after.decision, Decision::Deny);
    assert_eq!(after.reasons, vec!["forbid-code-search".to_owned()]);
    assert_ne!(after.policy_hash, before.policy_hash);

    // An invalid change (unknown attribute): refused, the last valid set stays.
    std::fs::write(
        policies.path().join("broken.cedar"),
        "@id(\"broken\")\npermit (principal, action, resource) when { principal.clearance == \"top\" };\n",
    )
    .unwrap();
    worker.wait_for_log("Policy reload refused").await;
    assert!(
        worker.log_text().contains("broken.cedar:2:"),
        "the refusal names file and line:\n{}",
        worker.log_text()
    );
    mesh.publish_event(
        "mesh.ingress.coder.tool_call",
        &code_search("after-invalid"),
    )
    .await
    .unwrap();
    let kept = mesh.receipt("after-invalid").await.unwrap();
    assert_eq!(kept.decision, Decision::Deny);
    assert_eq!(kept.policy_hash, after.policy_hash);

    // SIGHUP reloads too: remove the broken file and the forbid, then signal.
    std::fs::remove_file(policies.path().join("broken.cedar")).unwrap();
    std::fs::remove_file(policies.path().join("extra.cedar")).unwrap();
    worker.signal("HUP");
    testkit::eventually(WAIT, "the original policies back", || async {
        mesh.publish_event(
            "mesh.ingress.coder.tool_call",
            &code_search(&uuid::Uuid::now_v7().to_string()),
        )
        .await
        .unwrap();
        let last = mesh.receipts().await.unwrap().pop()?;
        (last.policy_hash == before.policy_hash).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn with_no_watch_only_sighup_reloads() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let mut worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &["--no-watch"]).await;
    mesh.publish_event("mesh.ingress.coder.tool_call", &code_search("before"))
        .await
        .unwrap();
    let before = mesh.receipt("before").await.unwrap();
    assert_eq!(before.decision, Decision::Allow);

    // A valid change on disk is not picked up on its own.
    std::fs::write(policies.path().join("extra.cedar"), FORBID_CODE_SEARCH).unwrap();
    mesh.publish_event("mesh.ingress.coder.tool_call", &code_search("unwatched"))
        .await
        .unwrap();
    let unwatched = mesh.receipt("unwatched").await.unwrap();
    assert_eq!(unwatched.decision, Decision::Allow);
    assert_eq!(unwatched.policy_hash, before.policy_hash);

    // SIGHUP loads it; the one reload names the signal as its cause (a
    // watcher would have queued its file change well before the signal).
    worker.signal("HUP");
    let after = testkit::eventually(WAIT, "the new policies after SIGHUP", || async {
        mesh.publish_event(
            "mesh.ingress.coder.tool_call",
            &code_search(&uuid::Uuid::now_v7().to_string()),
        )
        .await
        .unwrap();
        let last = mesh.receipts().await.unwrap().pop()?;
        (last.policy_hash != before.policy_hash).then_some(last)
    })
    .await
    .unwrap();
    assert_eq!(after.decision, Decision::Deny);
    assert_eq!(after.reasons, vec!["forbid-code-search".to_owned()]);
    let log = worker.log_text();
    let reloads: Vec<_> = log
        .lines()
        .filter(|l| l.contains("Policies reloaded."))
        .collect();
    assert_eq!(reloads.len(), 1, "{log}");
    assert!(reloads[0].contains("SIGHUP"), "{log}");
}

#[test]
fn invalid_policies_refuse_to_start_naming_file_and_line() {
    let policies = policies_copy();
    std::fs::write(
        policies.path().join("typo.cedar"),
        "// a comment\npermit (principal, action == Action::\"io.agentmesh.prompt\", resource)\nwhen { resource.nope == 1 };\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_policy-worker"))
        .args(["--nats-url", "nats://127.0.0.1:1", "--policies"])
        .arg(policies.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo.cedar:3:"), "{stderr}");

    std::fs::write(
        policies.path().join("typo.cedar"),
        "permit (principal, action, resource\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_policy-worker"))
        .args(["--nats-url", "nats://127.0.0.1:1", "--policies"])
        .arg(policies.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo.cedar:"), "{stderr}");
}

/// A policy that forbids `code.search`, for the reload tests.
const FORBID_CODE_SEARCH: &str = "@id(\"forbid-code-search\")\nforbid (principal, action == Action::\"io.agentmesh.tool.call\", resource == Tool::\"code.search\");\n";

/// The coder's `code.search` call to the reviewer (allowed by the shipped set).
fn code_search(id: &str) -> schemas::Event {
    event(id, "coder", "tool.call")
        .subject("code.search")
        .extension("target", "reviewer")
        .build()
        .unwrap()
}

//! The tool-result cache against a real nats-server and the real
//! `policy-worker` binary: tests publish calls and results like any NATS
//! client and read receipts and deliveries from their streams.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::support;

use std::time::{Duration, Instant};

use async_nats::jetstream::message::StreamMessage;
use schemas::{CacheStatus, Decision, EventBuilder, headers, subjects};
use serde_json::{Value, json};
use support::*;
use testkit::eventually;

const CACHE_TOML: &str = r#"
[tools."code.search"]
ttl_secs = 600
scope = "shared"

[tools."repo.write"]
ttl_secs = 600

[tools."shell.exec"]
ttl_secs = 600
"#;

/// The shipped policies plus `cache.toml` with `text`.
fn policies_with_cache(text: &str) -> tempfile::TempDir {
    let dir = policies_copy();
    std::fs::write(dir.path().join("cache.toml"), text).unwrap();
    dir
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// A `code.search` call (or another `tool`) from `caller` to `coder`.
fn call_of(id: &str, caller: &str, tool: &str, data: Value) -> schemas::Event {
    event(id, caller, "tool.call")
        .subject(tool)
        .extension("target", "coder")
        .extension("traceparent", format!("00-{TRACE}-b7ad6b7169203331-01"))
        .data("application/json", data)
        .build()
        .unwrap()
}

fn search(id: &str, caller: &str, query: &str) -> schemas::Event {
    call_of(
        id,
        caller,
        "code.search",
        json!({"tool": "code.search", "arguments": {"query": query, "path": "src/"}}),
    )
}

/// The coder's `tool.result` for call `call` of `caller`.
fn result(id: &str, from: &str, caller: &str, call: &str, data: Value) -> schemas::Event {
    event(id, from, "tool.result")
        .subject("code.search")
        .extension("target", caller)
        .extension("causationid", call)
        .extension("causationsource", format!("/agents/{caller}"))
        .extension("traceparent", format!("00-{TRACE}-c7ad6b7169203331-01"))
        .data("application/json", data)
        .build()
        .unwrap()
}

fn found(line: u32) -> Value {
    json!({"tool": "code.search", "ok": true, "result": {"matches": [{"path": "src/api.rs", "line": line}]}})
}

async fn send(mesh: &Mesh, subject_agent: &str, step: &str, event: &schemas::Event) {
    mesh.publish_event(&subjects::ingress(subject_agent, step), event)
        .await
        .unwrap();
}

/// Deliveries on `subject`, in order.
async fn deliveries(mesh: &Mesh, subject: &str) -> Vec<StreamMessage> {
    mesh.messages(subjects::STREAM_DELIVER)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.subject.as_str() == subject)
        .collect()
}

async fn wait_deliveries(mesh: &Mesh, subject: &str, n: usize) -> Vec<StreamMessage> {
    eventually(
        WAIT,
        &format!("{n} deliveries on {subject}"),
        || async move {
            let found = deliveries(mesh, subject).await;
            (found.len() >= n).then_some(found)
        },
    )
    .await
    .unwrap()
}

fn ce(m: &StreamMessage, name: &str) -> Option<String> {
    header(&m.headers, &format!("ce-{name}"))
}

/// A miss, then the result that fills the entry.
async fn fill(mesh: &Mesh, call: &str, caller: &str, answer: &str) {
    send(
        mesh,
        caller,
        "tool_call",
        &search(call, caller, "fn signup"),
    )
    .await;
    let receipt = mesh.receipt(call).await.unwrap();
    assert_eq!(receipt.cache, Some(CacheStatus::Miss), "{receipt:?}");
    send(
        mesh,
        "coder",
        "tool_result",
        &result(answer, "coder", caller, call, found(7)),
    )
    .await;
    let stored = mesh.receipt(answer).await.unwrap();
    assert_eq!(stored.cache, Some(CacheStatus::Stored), "{stored:?}");
    assert_eq!(
        stored.cache_source.as_deref(),
        Some(format!("{caller}/{call}").as_str())
    );
}

#[tokio::test]
async fn a_repeated_call_is_answered_from_the_cache_without_reaching_the_tool() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache(CACHE_TOML);
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    fill(&mesh, "c1", "planner", "r1").await;
    assert_eq!(
        deliveries(&mesh, "mesh.deliver.coder.planner").await.len(),
        1
    );

    // The same arguments in another order and spacing, from another caller
    // (the tool's scope is shared).
    let same: Value = serde_json::from_str(
        r#"{ "arguments": {"path":"src/", "query":"fn signup"}, "tool":"code.search" }"#,
    )
    .unwrap();
    send(
        &mesh,
        "reviewer",
        "tool_call",
        &call_of("c2", "reviewer", "code.search", same),
    )
    .await;
    let receipt = mesh.receipt("c2").await.unwrap();
    assert_eq!(receipt.decision, Decision::Allow);
    assert_eq!(receipt.cache, Some(CacheStatus::Hit));
    assert_eq!(receipt.cache_source.as_deref(), Some("planner/c1"));

    let answers = wait_deliveries(&mesh, "mesh.deliver.reviewer.coder", 1).await;
    let answer = &answers[0];
    assert_eq!(
        header(&answer.headers, headers::CACHE).as_deref(),
        Some("hit")
    );
    assert_eq!(
        header(&answer.headers, headers::CACHE_SOURCE).as_deref(),
        Some("planner/c1")
    );
    assert_eq!(
        header(&answer.headers, "Nats-Msg-Id").as_deref(),
        Some("reviewer/c2")
    );
    assert_eq!(
        ce(answer, "type").as_deref(),
        Some("io.agentmesh.tool.result")
    );
    assert_eq!(ce(answer, "source").as_deref(), Some("/agents/coder"));
    assert_eq!(ce(answer, "causationid").as_deref(), Some("c2"));
    assert_eq!(ce(answer, "target").as_deref(), Some("reviewer"));
    assert!(ce(answer, "traceparent").unwrap().contains(TRACE));
    assert_ne!(ce(answer, "id").as_deref(), Some("r1"), "a fresh id");
    let data: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(data, found(7));
    assert_eq!(
        header(&answer.headers, headers::DECISION_ID),
        Some(receipt.decision_id.clone())
    );
    // It reads as a valid delivery from the tool's agent, as the SDK reads it.
    schemas::MeshEvent::validate(
        "coder",
        schemas::decode(Some(&answer.headers), &answer.payload)
            .unwrap()
            .0,
        schemas::ContentMode::Binary,
        0,
    )
    .unwrap();

    // The tool's agent never saw the second call.
    assert!(
        deliveries(&mesh, "mesh.deliver.coder.reviewer")
            .await
            .is_empty()
    );
    assert_eq!(
        deliveries(&mesh, "mesh.deliver.coder.planner").await.len(),
        1
    );
}

#[tokio::test]
async fn denied_calls_errors_and_strangers_never_touch_the_cache() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache(CACHE_TOML);
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    // Declared cacheable but forbidden: denied before the cache is asked.
    send(
        &mesh,
        "coder",
        "tool_call",
        &call_of("x1", "coder", "shell.exec", json!({"cmd": "ls"})),
    )
    .await;
    let denied = mesh.receipt("x1").await.unwrap();
    assert_eq!((denied.decision, denied.cache), (Decision::Deny, None));

    // Not declared: no cache at all.
    send(
        &mesh,
        "planner",
        "tool_call",
        &call_of("t1", "planner", "tests.run", json!({"suite": "a"})),
    )
    .await;
    assert_eq!(mesh.receipt("t1").await.unwrap().cache, None);

    // Arguments that are not JSON bypass the cache.
    let text = event("b1", "planner", "tool.call")
        .subject("code.search")
        .extension("target", "coder")
        .data("text/plain", "fn signup")
        .build()
        .unwrap();
    send(&mesh, "planner", "tool_call", &text).await;
    assert_eq!(
        mesh.receipt("b1").await.unwrap().cache,
        Some(CacheStatus::Bypass)
    );

    // An error result is not stored.
    send(&mesh, "planner", "tool_call", &search("c1", "planner", "q")).await;
    assert_eq!(
        mesh.receipt("c1").await.unwrap().cache,
        Some(CacheStatus::Miss)
    );
    let error = json!({"tool": "code.search", "ok": false, "error": "index busy"});
    send(
        &mesh,
        "coder",
        "tool_result",
        &result("r1", "coder", "planner", "c1", error),
    )
    .await;
    assert_eq!(mesh.receipt("r1").await.unwrap().cache, None);

    // Another agent answering the call is delivered (policy allows it) but
    // cannot fill the cache.
    send(&mesh, "planner", "tool_call", &search("c2", "planner", "q")).await;
    assert_eq!(
        mesh.receipt("c2").await.unwrap().cache,
        Some(CacheStatus::Miss)
    );
    send(
        &mesh,
        "reviewer",
        "tool_result",
        &result("r2", "reviewer", "planner", "c2", found(1)),
    )
    .await;
    let forged = mesh.receipt("r2").await.unwrap();
    assert_eq!((forged.decision, forged.cache), (Decision::Allow, None));

    // So the next identical call still goes to the tool.
    send(&mesh, "planner", "tool_call", &search("c3", "planner", "q")).await;
    assert_eq!(
        mesh.receipt("c3").await.unwrap().cache,
        Some(CacheStatus::Miss)
    );
    // t1, b1, c1, c2 and c3.
    assert_eq!(
        deliveries(&mesh, "mesh.deliver.coder.planner").await.len(),
        5
    );
    // The planner got the coder's error answer, and nothing from the cache.
    let answers = deliveries(&mesh, "mesh.deliver.planner.coder").await;
    assert_eq!(answers.len(), 1);
    assert_eq!(ce(&answers[0], "id").as_deref(), Some("r1"));
    assert_eq!(header(&answers[0].headers, headers::CACHE), None);
}

#[tokio::test]
async fn caller_scope_keeps_entries_apart_and_the_ttl_expires_them() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache("[tools.\"code.search\"]\nttl_secs = 3\n");
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    fill(&mesh, "c1", "planner", "r1").await;
    let stored_at = Instant::now();
    // Another caller does not see the planner's entry.
    send(
        &mesh,
        "reviewer",
        "tool_call",
        &search("c2", "reviewer", "fn signup"),
    )
    .await;
    assert_eq!(
        mesh.receipt("c2").await.unwrap().cache,
        Some(CacheStatus::Miss)
    );

    // The planner's repeats hit until the TTL passes, then miss.
    let mut n = 0;
    let expired_after = eventually(Duration::from_secs(20), "the entry to expire", || {
        n += 1;
        let id = format!("p{n}");
        let mesh = &mesh;
        async move {
            send(
                mesh,
                "planner",
                "tool_call",
                &search(&id, "planner", "fn signup"),
            )
            .await;
            let receipt = mesh.receipt(&id).await.unwrap();
            match receipt.cache {
                Some(CacheStatus::Hit) => None,
                other => {
                    assert_eq!(other, Some(CacheStatus::Miss));
                    Some(stored_at.elapsed())
                }
            }
        }
    })
    .await
    .unwrap();
    assert!(mesh.receipt("p1").await.unwrap().cache == Some(CacheStatus::Hit));
    assert!(expired_after >= Duration::from_secs(3), "{expired_after:?}");
}

#[tokio::test]
async fn entries_survive_a_restart_and_are_shared_by_replicas_until_purged() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache(CACHE_TOML);
    let mut first = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;
    fill(&mesh, "c1", "planner", "r1").await;
    first.kill();

    // Two fresh replicas on the same durable consumer: whichever decides a
    // call finds the entry the first worker stored.
    let _a = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;
    let _b = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;
    for i in 0..6 {
        let id = format!("h{i}");
        send(
            &mesh,
            "planner",
            "tool_call",
            &search(&id, "planner", "fn signup"),
        )
        .await;
        assert_eq!(
            mesh.receipt(&id).await.unwrap().cache,
            Some(CacheStatus::Hit),
            "{id}"
        );
    }

    // Purging another tool keeps it; purging this one drops it.
    assert_eq!(
        broker_config::admin::purge_tool_cache(&mesh.js, Some("repo.write"))
            .await
            .unwrap(),
        0
    );
    send(
        &mesh,
        "planner",
        "tool_call",
        &search("k1", "planner", "fn signup"),
    )
    .await;
    assert_eq!(
        mesh.receipt("k1").await.unwrap().cache,
        Some(CacheStatus::Hit)
    );
    assert_eq!(
        broker_config::admin::purge_tool_cache(&mesh.js, Some("code.search"))
            .await
            .unwrap(),
        1
    );
    send(
        &mesh,
        "planner",
        "tool_call",
        &search("k2", "planner", "fn signup"),
    )
    .await;
    assert_eq!(
        mesh.receipt("k2").await.unwrap().cache,
        Some(CacheStatus::Miss)
    );
}

#[tokio::test]
async fn identical_concurrent_calls_reach_the_tool_once_across_two_replicas() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache(CACHE_TOML);
    let _a = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;
    let _b = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    const N: usize = 20;
    let calls: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
    let events: Vec<schemas::Event> = calls
        .iter()
        .map(|id| search(id, "planner", "cold"))
        .collect();
    futures::future::join_all(
        events
            .iter()
            .map(|e| send(&mesh, "planner", "tool_call", e)),
    )
    .await;

    // One call goes out; the others wait for its result.
    let out = wait_deliveries(&mesh, "mesh.deliver.coder.planner", 1).await;
    let leader = ce(&out[0], "id").unwrap();
    send(
        &mesh,
        "coder",
        "tool_result",
        &result("answer", "coder", "planner", &leader, found(3)),
    )
    .await;

    for id in &calls {
        let receipt = mesh.receipt(id).await.unwrap();
        let want = if *id == leader {
            CacheStatus::Miss
        } else {
            CacheStatus::Hit
        };
        assert_eq!(receipt.cache, Some(want), "{id}");
    }
    let answers = wait_deliveries(&mesh, "mesh.deliver.planner.coder", N).await;
    assert_eq!(answers.len(), N, "the real answer and N-1 cached ones");
    assert_eq!(
        deliveries(&mesh, "mesh.deliver.coder.planner").await.len(),
        1
    );
}

#[tokio::test]
async fn calls_waiting_for_a_result_that_never_comes_go_to_the_tool() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache(CACHE_TOML);
    let _worker = WorkerProcess::start(
        &mesh.nats.url(),
        policies.path(),
        &["--cache-flight-wait-ms", "300"],
    )
    .await;
    for id in ["w1", "w2", "w3"] {
        send(
            &mesh,
            "planner",
            "tool_call",
            &search(id, "planner", "slow"),
        )
        .await;
    }
    for id in ["w1", "w2", "w3"] {
        assert_eq!(
            mesh.receipt(id).await.unwrap().cache,
            Some(CacheStatus::Miss),
            "{id}"
        );
    }
    wait_deliveries(&mesh, "mesh.deliver.coder.planner", 3).await;
}

#[tokio::test]
async fn a_result_delivered_redacted_is_never_cached() {
    // Results with personal data reach their caller redacted: the cache
    // must not keep the original and hand it to the next identical call.
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_with_cache(CACHE_TOML);
    std::fs::write(
        policies.path().join("redact-results.cedar"),
        "@id(\"results-without-pii\")\n@redact(\"pii\")\npermit (principal in Role::\"member\", action == Action::\"io.agentmesh.tool.result\", resource in Role::\"member\")\nwhen { context.detectors.pii };\n",
    )
    .unwrap();
    let _worker = WorkerProcess::start(&mesh.nats.url(), policies.path(), &[]).await;

    send(
        &mesh,
        "planner",
        "tool_call",
        &search("c1", "planner", "owner"),
    )
    .await;
    assert_eq!(
        mesh.receipt("c1").await.unwrap().cache,
        Some(CacheStatus::Miss)
    );
    let owner = json!({"tool": "code.search", "ok": true, "result": {"owner": "bob@example.com"}});
    send(
        &mesh,
        "coder",
        "tool_result",
        &result("r1", "coder", "planner", "c1", owner),
    )
    .await;
    let answered = mesh.receipt("r1").await.unwrap();
    assert_eq!(answered.decision, Decision::Allow, "{answered:?}");
    assert_eq!(answered.redacted, vec!["pii.email"]);
    assert_eq!(answered.cache, None, "not stored: {answered:?}");
    let delivered = wait_deliveries(&mesh, "mesh.deliver.planner.coder", 1).await;
    let data = String::from_utf8_lossy(&delivered[0].payload).into_owned();
    assert!(data.contains("[REDACTED:pii.email]"), "{data}");

    // The same call again goes to the tool, not to a cached original.
    send(
        &mesh,
        "reviewer",
        "tool_call",
        &search("c2", "reviewer", "owner"),
    )
    .await;
    let again = mesh.receipt("c2").await.unwrap();
    assert_eq!(again.cache, Some(CacheStatus::Miss), "{again:?}");
    wait_deliveries(&mesh, "mesh.deliver.coder.reviewer", 1).await;
    assert!(
        deliveries(&mesh, "mesh.deliver.reviewer.coder")
            .await
            .is_empty()
    );
}

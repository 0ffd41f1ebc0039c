//! Agents under pressure, against a real nats-server (and, where calls are
//! routed, the real policy worker): a delivery that keeps failing ends after
//! the configured attempts with a report the audit records, a transient
//! failure succeeds on retry, tool calls are answered while thousands of
//! deliveries wait, deliveries pulled ahead are not delivered twice, and an
//! agent killed mid-batch loses nothing.

// Test helpers outside `#[test]` fns panic to fail the test, too.
#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::sdk_support as support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agents_sdk::{Agent, Delivery, EventType, ToolCall, ToolSpec, payload};
use schemas::{
    AttributesReader, EventBuilder, EventBuilderV10, Limits, MeshEvent, headers, subjects,
};
use serde_json::json;
use support::*;
use testkit::eventually;
use tokio_util::sync::CancellationToken;

/// Stores `n` task handoffs from `source` to `target` straight into
/// `MESH_DELIVER`, as the policy worker would have routed them while the
/// target was away; returns their ids in order.
async fn backlog(mesh: &Mesh, source: &str, target: &str, n: usize) -> Vec<String> {
    let subject = subjects::deliver(target, source);
    let mut ids = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let event = EventBuilderV10::new()
            .id(id.clone())
            .source(format!("/agents/{source}"))
            .ty(EventType::TaskHandoff.as_str())
            .extension("target", target)
            .data("application/json", json!({"task": format!("task {i}")}))
            .build()
            .unwrap();
        let (mut headers, payload) = schemas::encode_binary(&event);
        mesh.sign(&mut headers, &payload).await;
        acks.push(
            mesh.js
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .unwrap(),
        );
        ids.push(id);
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    ids
}

/// Runs `agent.serve_with(handler)` in the background until the token is
/// cancelled.
fn serve_with<F, Fut>(agent: &Agent, handler: F) -> (CancellationToken, tokio::task::JoinHandle<()>)
where
    F: FnMut(Delivery) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let token = CancellationToken::new();
    let handle = tokio::spawn({
        let agent = agent.clone();
        let token = token.clone();
        async move {
            agent
                .serve_with(token.cancelled_owned(), handler)
                .await
                .unwrap()
        }
    });
    (token, handle)
}

/// The ingress events `agent` published of type `ty`, validated.
async fn published(mesh: &Mesh, agent: &str, ty: EventType) -> Vec<MeshEvent> {
    mesh.messages(subjects::STREAM_INGRESS)
        .await
        .unwrap()
        .iter()
        .filter(|m| m.subject.starts_with(&format!("mesh.ingress.{agent}.")))
        .filter_map(|m| {
            MeshEvent::from_message(&m.subject, Some(&m.headers), &m.payload, Limits::default())
                .ok()
        })
        .filter(|e| e.event_type == ty)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_keeps_failing_ends_after_the_configured_attempts_with_a_report() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let coder = mesh
        .agent(
            Agent::builder("coder")
                .max_attempts(3)
                .nak_delay(Duration::from_millis(50)),
        )
        .await;
    // A handoff whose data the coder's handler cannot read.
    let wf = planner.workflow();
    let poison = wf
        .step(EventType::TaskHandoff)
        .target("coder")
        .data(json!({"job": "no task field"}))
        .await
        .unwrap();

    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (stop, served) = serve_with(&coder, {
        let attempts = attempts.clone();
        move |d: Delivery| {
            *attempts
                .lock()
                .unwrap()
                .entry(d.id().to_owned())
                .or_default() += 1;
            async move {
                let handoff: payload::TaskHandoff = d.json().map_err(|e| e.to_string())?;
                let _ = handoff.task;
                Ok(())
            }
        }
    });

    let report = eventually(WAIT, "the give-up report", || async {
        published(&mesh, "coder", EventType::Observation)
            .await
            .into_iter()
            .next()
    })
    .await
    .unwrap();
    // The report follows the poison delivery in its trace and says why.
    assert_eq!(report.event.subject(), Some(payload::GAVE_UP_SUBJECT));
    assert_eq!(report.causation_id.as_deref(), Some(poison.id.as_str()));
    assert_eq!(report.causation_agent.as_deref(), Some("planner"));
    assert_eq!(report.trace.trace_id_hex(), wf.trace_id());
    let data: payload::DeliveryGaveUp = serde_json::from_slice(&report.data_bytes()).unwrap();
    assert_eq!(data.gave_up.event_id, poison.id);
    assert_eq!(data.gave_up.source, "planner");
    assert_eq!(data.gave_up.r#type, "io.agentmesh.task.handoff");
    assert_eq!(data.gave_up.attempts, 3);
    assert!(
        data.gave_up.error.starts_with("missing field `task`"),
        "{}",
        data.gave_up.error
    );
    assert!(
        data.text.starts_with(&format!(
            "coder gave up on task.handoff {} from planner after 3 attempts: missing field `task`",
            poison.id
        )),
        "{}",
        data.text
    );
    // The worker decided the report like any step: the audit records it.
    let receipt = mesh.receipt(report.id()).await.unwrap();
    assert_eq!(receipt.decision, agents_sdk::Decision::Allow);

    // The poison delivery is over: the next handoff is handled, and the
    // poison is not attempted again.
    let next = planner
        .workflow()
        .handoff("coder", "a real task")
        .await
        .unwrap();
    eventually(
        WAIT,
        "the next handoff handled and the backlog empty",
        || async {
            let handled = attempts.lock().unwrap().get(&next.id).copied() == Some(1);
            (handled && mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(attempts.lock().unwrap().get(&poison.id).copied(), Some(3));
    let metrics = coder.metrics();
    assert_eq!(
        (metrics.retries, metrics.gave_up, metrics.handled),
        (2, 1, 1)
    );
    assert_eq!(
        published(&mesh, "coder", EventType::Observation)
            .await
            .len(),
        1
    );
    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_succeeds_on_a_later_attempt_after_a_growing_backoff() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let delay = Duration::from_millis(200);
    let coder = mesh
        .agent(Agent::builder("coder").max_attempts(5).nak_delay(delay))
        .await;
    let handoff = planner.workflow().handoff("coder", "flaky").await.unwrap();

    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (stop, served) = serve_with(&coder, {
        let times = times.clone();
        move |d: Delivery| {
            let n = {
                let mut times = times.lock().unwrap();
                times.push(Instant::now());
                times.len()
            };
            async move {
                assert_eq!(d.delivery_count() as usize, n);
                if n < 3 {
                    Err(format!("attempt {n}: the model timed out"))
                } else {
                    Ok(())
                }
            }
        }
    });
    eventually(WAIT, "three attempts and an ack", || async {
        (times.lock().unwrap().len() == 3 && mesh.backlog("coder").await.unwrap() == (0, 0))
            .then_some(())
    })
    .await
    .unwrap();
    let times = times.lock().unwrap().clone();
    // The server holds a refused delivery for the delay it was given:
    // 200 ms after the first failure, 400 ms after the second.
    assert!(times[1] - times[0] >= delay, "{:?}", times[1] - times[0]);
    assert!(
        times[2] - times[1] >= 2 * delay,
        "{:?}",
        times[2] - times[1]
    );
    let metrics = coder.metrics();
    assert_eq!(
        (metrics.retries, metrics.gave_up, metrics.handled),
        (2, 0, 1)
    );
    assert!(
        published(&mesh, "coder", EventType::Observation)
            .await
            .is_empty()
    );
    stop.cancel();
    served.await.unwrap();
    let _ = handoff;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_answered_while_thousands_of_deliveries_wait() {
    const BACKLOG: usize = 5_000;
    let mesh = Mesh::with_worker().await;
    // Both sides have a backlog: the serving agent's handoffs, and the
    // caller's own deliveries, each handled at 5 ms apiece (25 s to drain).
    backlog(&mesh, "planner", "coder", BACKLOG).await;
    backlog(&mesh, "coder", "planner", BACKLOG).await;
    let slow = |handled: Arc<AtomicUsize>| {
        move |_d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };
    let searches = Arc::new(AtomicUsize::new(0));
    let coder = mesh
        .agent(Agent::builder("coder").tool(ToolSpec::new("code.search"), {
            let searches = searches.clone();
            move |call: ToolCall| {
                searches.fetch_add(1, Ordering::SeqCst);
                async move { Ok(json!({"query": call.arg::<String>("query")?})) }
            }
        }))
        .await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let coder_handled = Arc::new(AtomicUsize::new(0));
    let planner_handled = Arc::new(AtomicUsize::new(0));
    let (stop_coder, coder_served) = serve_with(&coder, slow(coder_handled.clone()));
    let (stop_planner, planner_served) = serve_with(&planner, slow(planner_handled.clone()));
    eventually(
        WAIT,
        "both agents working through their backlogs",
        || async {
            (coder_handled.load(Ordering::SeqCst) > 0 && planner_handled.load(Ordering::SeqCst) > 0)
                .then_some(())
        },
    )
    .await
    .unwrap();

    const CALLS: usize = 50;
    let mut latencies = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let started = Instant::now();
        let answer = planner
            .workflow()
            .call_tool("code.search", json!({"query": format!("q{i}")}))
            .on("coder")
            .timeout(Duration::from_secs(10))
            .await
            .unwrap();
        latencies.push(started.elapsed());
        assert_eq!(answer, json!({"query": format!("q{i}")}));
    }
    // Every call was answered while both backlogs were still mostly there:
    // none waited behind the deliveries queued before it.
    let coder_pending = coder.pending().await.unwrap();
    let planner_pending = planner.pending().await.unwrap();
    let coder_done = coder_handled.load(Ordering::SeqCst);
    let planner_done = planner_handled.load(Ordering::SeqCst);
    latencies.sort();
    println!(
        "{CALLS} tool calls with {BACKLOG} deliveries queued on each side: p50 {:?}, p99 {:?}, max {:?}; meanwhile coder handled {coder_done}, planner {planner_done}; coder pending {coder_pending:?}",
        latencies[CALLS / 2],
        latencies[CALLS * 99 / 100],
        latencies[CALLS - 1],
    );
    assert!(coder_done < BACKLOG / 2, "coder handled {coder_done}");
    assert!(planner_done < BACKLOG / 2, "planner handled {planner_done}");
    assert!(
        coder_pending.deliveries as usize > BACKLOG / 2,
        "{coder_pending:?}"
    );
    assert!(
        planner_pending.deliveries as usize > BACKLOG / 2,
        "{planner_pending:?}"
    );
    assert_eq!(searches.load(Ordering::SeqCst), CALLS);
    assert_eq!((coder_pending.calls, coder_pending.calls_unacked), (0, 0));
    stop_coder.cancel();
    stop_planner.cancel();
    coder_served.await.unwrap();
    planner_served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_is_stored_for_old_clients_too_and_answered_once() {
    let mesh = Mesh::with_worker().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let coder = mesh
        .agent(Agent::builder("coder").tool(ToolSpec::new("code.search"), {
            let runs = runs.clone();
            move |_call: ToolCall| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move { Ok(json!("found")) }
            }
        }))
        .await;
    let (stop, served) = serve_with(&coder, |_d: Delivery| async { Ok(()) });
    let planner = mesh.agent(Agent::builder("planner")).await;
    let result = planner
        .workflow()
        .call_tool("code.search", json!({"query": "x"}))
        .on("coder")
        .await
        .unwrap();
    assert_eq!(result, json!("found"));

    // The call is on `mesh.call` for agents that read calls there, and on
    // `mesh.deliver` (naming its `mesh.call` copy) for every other client.
    let on_calls = mesh
        .messages_on(subjects::STREAM_CALL, "mesh.call.coder.planner")
        .await
        .unwrap();
    let on_deliver = mesh
        .messages_on(subjects::STREAM_DELIVER, "mesh.deliver.coder.planner")
        .await
        .unwrap();
    assert_eq!((on_calls.len(), on_deliver.len()), (1, 1));
    assert_eq!(on_calls[0].payload, on_deliver[0].payload);
    assert_eq!(
        header(&on_deliver[0], headers::CALL).as_deref(),
        Some("mesh.call.coder.planner")
    );
    assert_eq!(
        header(&on_calls[0], "ce-type").as_deref(),
        Some("io.agentmesh.tool.call")
    );

    // A worker without `MESH_CALL` routes a call as a delivery only: the
    // agent answers it from there.
    let call = EventBuilderV10::new()
        .id("old-worker-call")
        .source("/agents/planner")
        .ty(EventType::ToolCall.as_str())
        .subject("code.search")
        .extension("target", "coder")
        .data(
            "application/json",
            json!({"tool": "code.search", "arguments": {}}),
        )
        .build()
        .unwrap();
    let (mut h, p) = schemas::encode_binary(&call);
    mesh.sign(&mut h, &p).await;
    mesh.js
        .publish_with_headers("mesh.deliver.coder.planner", h, p)
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(WAIT, "both calls answered and settled", || async {
        let settled = mesh.backlog("coder").await.unwrap() == (0, 0);
        (runs.load(Ordering::SeqCst) == 2 && settled).then_some(())
    })
    .await
    .unwrap();
    let results = published(&mesh, "coder", EventType::ToolResult).await;
    assert_eq!(results.len(), 2);
    assert_eq!(coder.metrics().tool_calls, 2);
    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_pulled_ahead_are_not_delivered_twice_while_they_wait() {
    let mesh = Mesh::start().await;
    // 100 deliveries at 30 ms each take 3 s; the ack wait is 1 s, and 64 of
    // them wait in the agent's buffer at first.
    let ids = backlog(&mesh, "planner", "coder", 100).await;
    let coder = mesh
        .agent(
            Agent::builder("coder")
                .ack_wait(Duration::from_secs(1))
                .prefetch(64),
        )
        .await;
    let counts: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let (stop, served) = serve_with(&coder, {
        let counts = counts.clone();
        move |d: Delivery| {
            counts
                .lock()
                .unwrap()
                .push((d.id().to_owned(), d.delivery_count()));
            async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok(())
            }
        }
    });
    eventually(WAIT, "all 100 handled and acknowledged", || async {
        (counts.lock().unwrap().len() >= 100 && mesh.backlog("coder").await.unwrap() == (0, 0))
            .then_some(())
    })
    .await
    .unwrap();
    let counts = counts.lock().unwrap().clone();
    let handled: Vec<&str> = counts.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(handled, ids, "each once, in order");
    assert!(counts.iter().all(|(_, n)| *n == 1), "{counts:?}");
    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_batch_loses_nothing_and_repeats_only_unacknowledged_work() {
    const N: usize = 2_000;
    const CONCURRENCY: usize = 8;
    let mesh = Mesh::start().await;
    let ids = backlog(&mesh, "planner", "coder", N).await;
    let builder = || {
        Agent::builder("coder")
            .ack_wait(Duration::from_secs(1))
            .max_concurrent_deliveries(CONCURRENCY)
    };
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler = |handled: Arc<Mutex<Vec<String>>>| {
        move |d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::task::yield_now().await;
                handled.lock().unwrap().push(d.id().to_owned());
                Ok(())
            }
        }
    };

    // The first incarnation is killed while a batch is in its hands.
    let first = mesh.agent(builder()).await;
    let (_stop, served) = serve_with(&first, handler(handled.clone()));
    eventually(WAIT, "the first incarnation to be mid-way", || async {
        (handled.lock().unwrap().len() >= N / 4).then_some(())
    })
    .await
    .unwrap();
    served.abort();
    let _ = served.await;
    let by_first = handled.lock().unwrap().len();
    drop(first);

    let second = mesh.agent(builder()).await;
    let (stop, served) = serve_with(&second, handler(handled.clone()));
    eventually(WAIT, "every delivery handled and acknowledged", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
    stop.cancel();
    served.await.unwrap();

    let handled = handled.lock().unwrap().clone();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for id in &handled {
        *times.entry(id.as_str()).or_default() += 1;
    }
    // Nothing lost.
    assert!(ids.iter().all(|id| times.contains_key(id.as_str())));
    assert_eq!(times.len(), N);
    // Handled twice only where the first incarnation had finished the
    // handler but not yet acknowledged: at most one per handler slot.
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "killed after {by_first} handled; {} handled again by the second incarnation",
        twice.len()
    );
    assert!(twice.len() <= CONCURRENCY, "{twice:?}");
    assert!(twice.iter().all(|(_, n)| **n == 2));
}

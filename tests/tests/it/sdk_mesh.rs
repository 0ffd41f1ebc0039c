//! The SDK against the whole mesh: a real nats-server and the real policy
//! worker on the shipped `policies/` (planner, coder, reviewer; `shell.exec`
//! forbidden; `code.search` low risk).

// Test helpers outside `#[test]` fns panic to fail the test, too.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails"
)]

use crate::sdk_support as support;

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agents_sdk::{
    Agent, CallErrorKind, Decision, Delivery, EventType, PublishError, ToolCall, ToolError,
    ToolSpec, payload,
};
use futures::StreamExt;
use schemas::subjects;
use serde_json::json;
use support::*;
use testkit::eventually;
use tokio_util::sync::CancellationToken;

/// Runs `agent.serve` in the background until the returned token is cancelled.
fn serve(agent: &Agent) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let handle = tokio::spawn({
        let agent = agent.clone();
        let token = token.clone();
        async move { agent.serve(token.cancelled_owned()).await.unwrap() }
    });
    (token, handle)
}

async fn next_delivery(deliveries: &mut agents_sdk::Deliveries) -> Delivery {
    tokio::time::timeout(WAIT, deliveries.next())
        .await
        .expect("no delivery in time")
        .expect("delivery stream ended")
        .expect("delivery error")
}

/// Waits until `subject` holds `n` deliveries and the planner's consumer has
/// settled them all, failing if `deliveries` yields any of them.
async fn drains_silently(
    mesh: &Mesh,
    deliveries: &mut agents_sdk::Deliveries,
    subject: &str,
    n: usize,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::select! {
            d = deliveries.next() => {
                panic!("unexpected delivery: {:?}", d.map(|d| d.map(|d| d.event_type())));
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {
                let delivered = mesh.messages_on(subjects::STREAM_DELIVER, subject).await.unwrap().len();
                if delivered == n && mesh.backlog("planner").await.unwrap() == (0, 0) {
                    return;
                }
                assert!(Instant::now() < deadline, "{delivered} of {n} answers on `{subject}`, backlog {:?}", mesh.backlog("planner").await.unwrap());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_is_delivered_to_the_target_in_the_same_trace() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let coder = mesh.agent(Agent::builder("coder")).await;

    let wf = planner.workflow();
    let prompt = wf.prompt("Add a parser test").await.unwrap();
    let handoff = wf
        .handoff("coder", "write the parser test")
        .with("context", json!({"file": "src/parser.rs"}))
        .await
        .unwrap();

    let mut deliveries = coder.deliveries().await.unwrap();
    let d = next_delivery(&mut deliveries).await;
    assert_eq!(d.id(), handoff.id);
    assert_eq!(d.event_type(), EventType::TaskHandoff);
    assert_eq!(d.sender().as_str(), "planner");
    assert_eq!(d.target().map(|t| t.as_str()), Some("coder"));
    assert_eq!(d.trace_id(), wf.trace_id());
    assert_eq!(d.causation_id(), Some(prompt.id.as_str()));
    assert_eq!(d.delivery_count(), 1);
    let task: payload::TaskHandoff = d.json().unwrap();
    assert_eq!(task.task, "write the parser test");
    assert_eq!(task.context, Some(json!({"file": "src/parser.rs"})));
    assert_eq!(d.message().subject.as_str(), "mesh.deliver.coder.planner");

    // The coder continues the planner's trace, after the handoff.
    let out = d.workflow().output("test written").await.unwrap();
    d.ack().await.unwrap();
    let m = mesh.ingress(out.sequence).await;
    assert_eq!(header(&m, "ce-source").as_deref(), Some("/agents/coder"));
    assert_eq!(header(&m, "ce-causationid"), Some(handoff.id.clone()));
    // ...and names the planner as its cause's source.
    assert_eq!(
        header(&m, "ce-causationsource").as_deref(),
        Some("/agents/planner")
    );
    assert_eq!(out.trace.trace_id_hex(), wf.trace_id());

    // Receipts for events this agent published, awaited after the fact.
    let receipt = planner.await_decision(&handoff.id).await.unwrap();
    assert_eq!(receipt.decision, Decision::Allow);
    assert_eq!(receipt.reasons, ["orchestrators-hand-off"]);
    assert_eq!(receipt.trace_id, wf.trace_id());
    let receipt = coder.await_decision(&out.id).await.unwrap();
    assert_eq!(receipt.decision, Decision::Allow);

    eventually(WAIT, "the handoff to be acknowledged", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
}

/// How many times each of `code_search_agent`'s handlers ran.
#[derive(Clone, Default)]
struct Runs {
    search: Arc<AtomicUsize>,
    shell: Arc<AtomicUsize>,
}

fn code_search_agent(runs: Runs) -> agents_sdk::AgentBuilder {
    let Runs { search, shell } = runs;
    Agent::builder("coder")
        .tool(
            ToolSpec::new("code.search").input_schema(json!({
                "type": "object",
                "properties": {"query": {"type": "string"}}
            })),
            move |call: ToolCall| {
                let search = search.clone();
                async move {
                    search.fetch_add(1, Ordering::SeqCst);
                    let query: String = call.arg("query")?;
                    if query.is_empty() {
                        return Err(ToolError::new("`query` is empty"));
                    }
                    // The serving agent records its own step in the caller's trace.
                    call.workflow().reasoning(format!("searching for {query}")).await?;
                    Ok(json!({"matches": [format!("src/parser.rs: fn {query}")], "caller": call.caller().as_str()}))
                }
            },
        )
        .tool(ToolSpec::new("tests.run"), |call: ToolCall| async move {
            let crash: bool = call.arg("crash").unwrap_or(true);
            assert!(!crash, "the test runner crashed");
            Ok(json!({"passed": 1}))
        })
        // `shell.exec` is listed and served, yet policy forbids calling it.
        .tool(ToolSpec::new("shell.exec"), move |_call: ToolCall| {
            shell.fetch_add(1, Ordering::SeqCst);
            async move { Ok(json!("this must never run")) }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_round_trips_through_the_policy_worker() {
    let mesh = Mesh::with_worker().await;
    let runs = Runs::default();
    let coder = mesh.agent(code_search_agent(runs.clone())).await;
    let (stop, served) = serve(&coder);
    let planner = mesh.agent(Agent::builder("planner")).await;

    let wf = planner.workflow();
    wf.prompt("Where is the parser?").await.unwrap();
    // No `.on(..)`: the provider is found by its card.
    let result = wf
        .call_tool("code.search", json!({"query": "parse"}))
        .await
        .unwrap();
    assert_eq!(
        result,
        json!({"matches": ["src/parser.rs: fn parse"], "caller": "planner"})
    );
    assert_eq!(runs.search.load(Ordering::SeqCst), 1);

    // On the wire: call and result linked by causation, in one trace.
    let ingress = mesh.messages(subjects::STREAM_INGRESS).await.unwrap();
    let call = ingress
        .iter()
        .find(|m| m.subject.as_str() == "mesh.ingress.planner.tool_call")
        .unwrap();
    let result_msg = ingress
        .iter()
        .find(|m| m.subject.as_str() == "mesh.ingress.coder.tool_result")
        .unwrap();
    let call_id = header(call, "ce-id").unwrap();
    assert_eq!(header(call, "ce-subject").as_deref(), Some("code.search"));
    assert_eq!(header(call, "ce-target").as_deref(), Some("coder"));
    assert_eq!(header(result_msg, "ce-causationid"), Some(call_id.clone()));
    assert_eq!(
        header(result_msg, "ce-causationsource").as_deref(),
        Some("/agents/planner")
    );
    assert_eq!(header(result_msg, "ce-target").as_deref(), Some("planner"));
    assert_eq!(
        header(result_msg, "ce-subject").as_deref(),
        Some("code.search")
    );
    for m in [call, result_msg] {
        let tp: schemas::TraceParent = header(m, "ce-traceparent").unwrap().parse().unwrap();
        assert_eq!(tp.trace_id_hex(), wf.trace_id());
    }
    let reasoning = ingress
        .iter()
        .find(|m| m.subject.as_str() == "mesh.ingress.coder.reasoning")
        .unwrap();
    assert_eq!(header(reasoning, "ce-causationid"), Some(call_id.clone()));
    assert_eq!(
        mesh.receipt(&call_id).await.unwrap().reasons,
        ["members-call-low-risk-tools"]
    );

    // The next step follows the result.
    let result_id = header(result_msg, "ce-id").unwrap();
    assert_eq!(wf.last_event_id(), Some(result_id.clone()));
    let obs = wf.observation("found it").await.unwrap();
    let obs = mesh.ingress(obs.sequence).await;
    assert_eq!(header(&obs, "ce-causationid"), Some(result_id));
    // The answer came from the coder: the planner's step names it.
    assert_eq!(
        header(&obs, "ce-causationsource").as_deref(),
        Some("/agents/coder")
    );

    // A tool error comes back as a typed failure.
    let err = wf
        .call_tool("code.search", json!({"query": ""}))
        .on("coder")
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        CallErrorKind::ToolFailed {
            tool: "code.search".into(),
            message: "`query` is empty".into()
        }
    );

    // So does a panic.
    let err = wf.call_tool("tests.run", json!({})).await.unwrap_err();
    assert_eq!(
        err.kind(),
        CallErrorKind::ToolFailed {
            tool: "tests.run".into(),
            message: "tool `tests.run` panicked".into()
        }
    );

    // The planner's own delivery stream does not see the results again.
    let mut deliveries = planner.deliveries().await.unwrap();
    drains_silently(&mesh, &mut deliveries, "mesh.deliver.planner.coder", 3).await;

    stop.cancel();
    served.await.unwrap();
    assert_eq!(mesh.backlog("coder").await.unwrap(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_tool_call_is_a_typed_denial_with_the_policy_reasons() {
    let mesh = Mesh::with_worker().await;
    let runs = Runs::default();
    let coder = mesh.agent(code_search_agent(runs.clone())).await;
    let (stop, served) = serve(&coder);
    let planner = mesh.agent(Agent::builder("planner")).await;

    let wf = planner.workflow();
    let err = wf
        .call_tool("shell.exec", json!({"cmd": "rm -rf /"}))
        .await
        .unwrap_err();
    let receipt = err
        .denial()
        .unwrap_or_else(|| panic!("not a denial: {err}"));
    assert_eq!(receipt.decision, Decision::Deny);
    assert!(
        receipt.reasons.contains(&"forbid-shell-exec".to_owned()),
        "{:?}",
        receipt.reasons
    );
    assert_eq!(receipt.subject.as_deref(), Some("shell.exec"));
    assert_eq!(receipt.trace_id, wf.trace_id());
    assert!(matches!(err.kind(), CallErrorKind::Denied(_)));
    assert!(err.to_string().contains("forbid-shell-exec"), "{err}");

    // Dead-lettered, never delivered, never run.
    let dead = mesh
        .messages_on(subjects::STREAM_DEAD, "mesh.dead.planner")
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "ce-id").as_deref(),
        Some(receipt.event_id.as_str())
    );
    assert!(
        mesh.messages_on(subjects::STREAM_DELIVER, "mesh.deliver.coder.planner")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(runs.shell.load(Ordering::SeqCst), 0);
    assert_eq!(runs.search.load(Ordering::SeqCst), 0);

    // A step from an agent the operator never registered is denied too.
    let stranger = mesh.agent(Agent::builder("stranger")).await;
    let err = stranger
        .workflow()
        .call_tool("code.search", json!({"query": "x"}))
        .on("coder")
        .await
        .unwrap_err();
    assert_eq!(
        err.denial().map(|r| r.decision),
        Some(Decision::Deny),
        "{err}"
    );

    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_no_card_lists_is_reported_after_policy_allowed_it() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let err = planner
        .workflow()
        .call_tool("tests.run", json!({}))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        CallErrorKind::NoProvider("tests.run".into()),
        "{err}"
    );
    // The attempt is on record all the same.
    let call = mesh
        .messages_on(subjects::STREAM_INGRESS, "mesh.ingress.planner.tool_call")
        .await
        .unwrap();
    assert_eq!(call.len(), 1);
    assert_eq!(header(&call[0], "ce-target"), None);
    let receipt = mesh
        .receipt(&header(&call[0], "ce-id").unwrap())
        .await
        .unwrap();
    assert_eq!(receipt.decision, Decision::Allow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_that_never_answers_times_out_cleanly() {
    let mesh = Mesh::with_worker().await;
    // The coder lists `tests.run` in its card but is not serving yet.
    let coder_builder = || {
        Agent::builder("coder").tool(ToolSpec::new("tests.run"), |_call: ToolCall| async move {
            Ok(json!({"passed": 12}))
        })
    };
    let coder = mesh.agent(coder_builder()).await;
    let planner = mesh.agent(Agent::builder("planner")).await;

    let wf = planner.workflow();
    let timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let err = wf
        .call_tool("tests.run", json!({}))
        .timeout(timeout)
        .await
        .unwrap_err();
    assert!(started.elapsed() >= timeout);
    assert_eq!(
        err.kind(),
        CallErrorKind::TimedOut {
            after: timeout,
            decision: Some(Decision::Allow)
        },
        "{err}"
    );
    assert!(err.is_timeout());

    // The workflow goes on; a later call works once the tool is served.
    let (stop, served) = serve(&coder);
    let result = wf.call_tool("tests.run", json!({})).await.unwrap();
    assert_eq!(result, json!({"passed": 12}));

    // The late answer to the timed-out call (served now) is not handed to
    // the planner's delivery loop: the call it answers was this process's own.
    let mut deliveries = planner.deliveries().await.unwrap();
    drains_silently(&mesh, &mut deliveries, "mesh.deliver.planner.coder", 2).await;

    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_reply_between_two_agents() {
    let mesh = Mesh::with_worker().await;
    let reviewer = mesh.agent(Agent::builder("reviewer")).await;
    let stop = CancellationToken::new();
    let served = tokio::spawn({
        let reviewer = reviewer.clone();
        let stop = stop.clone();
        async move {
            reviewer
                .serve_with(stop.cancelled_owned(), |d: Delivery| async move {
                    let request: payload::Message = d.json().map_err(|e| e.to_string())?;
                    let diff = request.body["diff"].as_str().unwrap_or_default().to_owned();
                    d.reply(json!({"approved": !diff.contains("unsafe")}))
                        .await
                        .map_err(|e: PublishError| e.to_string())?;
                    Ok::<_, String>(())
                })
                .await
                .unwrap()
        }
    });
    let planner = mesh.agent(Agent::builder("planner")).await;
    let wf = planner.workflow();

    let reply = wf
        .request("reviewer", json!({"diff": "+ fn parse() {}"}))
        .await
        .unwrap();
    assert_eq!(reply.sender().as_str(), "reviewer");
    assert_eq!(reply.event_type(), EventType::Message);
    assert_eq!(reply.trace_id(), wf.trace_id());
    let body: payload::Message = reply.json().unwrap();
    assert_eq!(body.body, json!({"approved": true}));
    let request_id = reply.causation_id().unwrap().to_owned();
    let request = mesh.receipt(&request_id).await.unwrap();
    assert_eq!(request.event_type, "io.agentmesh.message");
    assert_eq!(request.target.as_deref(), Some("reviewer"));

    let reply = wf
        .request("reviewer", json!({"diff": "+ unsafe {}"}))
        .await
        .unwrap();
    assert_eq!(
        reply.json::<payload::Message>().unwrap().body,
        json!({"approved": false})
    );

    stop.cancel();
    served.await.unwrap();
    eventually(
        WAIT,
        "the reviewer to acknowledge both requests",
        || async { (mesh.backlog("reviewer").await.unwrap() == (0, 0)).then_some(()) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_gets_its_unacked_deliveries_again_on_restart() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let coder_builder = || Agent::builder("coder").ack_wait(Duration::from_secs(1));

    let first = planner
        .workflow()
        .handoff("coder", "task one")
        .await
        .unwrap();
    let second = planner
        .workflow()
        .handoff("coder", "task two")
        .await
        .unwrap();

    // The first incarnation takes both, finishes only the first, and dies.
    {
        let client = async_nats::connect(mesh.url()).await.unwrap();
        let coder = coder_builder().connect_with(client.clone()).await.unwrap();
        let mut deliveries = coder.deliveries().await.unwrap();
        let a = next_delivery(&mut deliveries).await;
        let b = next_delivery(&mut deliveries).await;
        // The worker decides events concurrently, so the two deliveries
        // may be stored in either order.
        let (done, unfinished) = if a.id() == first.id { (a, b) } else { (b, a) };
        assert_eq!(
            (done.id(), unfinished.id()),
            (first.id.as_str(), second.id.as_str())
        );
        done.ack().await.unwrap();
        client.flush().await.unwrap();
        // `unfinished` is dropped unacknowledged with everything else: a crash.
    }

    // The restarted agent gets the unfinished one again, and only it.
    let coder = mesh.agent(coder_builder()).await;
    let mut deliveries = coder.deliveries().await.unwrap();
    let again = next_delivery(&mut deliveries).await;
    assert_eq!(again.id(), second.id);
    assert!(again.delivery_count() >= 2, "{}", again.delivery_count());
    assert_eq!(
        again.json::<payload::TaskHandoff>().unwrap().task,
        "task two"
    );
    again.ack().await.unwrap();
    eventually(WAIT, "the coder's backlog to drain", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_gets_the_delivery_again() {
    let mesh = Mesh::with_worker().await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let coder = mesh
        .agent(Agent::builder("coder").nak_delay(Duration::from_millis(100)))
        .await;
    let handoff = planner.workflow().handoff("coder", "flaky").await.unwrap();

    let attempts = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let served = tokio::spawn({
        let coder = coder.clone();
        let stop = stop.clone();
        let attempts = attempts.clone();
        async move {
            coder
                .serve_with(stop.cancelled_owned(), move |d: Delivery| {
                    let attempts = attempts.clone();
                    async move {
                        let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                        assert_eq!(d.delivery_count() as usize, n);
                        if n < 3 {
                            Err(format!("attempt {n} failed"))
                        } else {
                            Ok(())
                        }
                    }
                })
                .await
                .unwrap()
        }
    });
    eventually(WAIT, "three attempts and an ack", || async {
        (attempts.load(Ordering::SeqCst) == 3 && mesh.backlog("coder").await.unwrap() == (0, 0))
            .then_some(())
    })
    .await
    .unwrap();
    stop.cancel();
    served.await.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let _ = handoff;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_deliveries_are_terminated_not_retried() {
    let mesh = Mesh::with_worker().await;
    let coder = mesh
        .agent(Agent::builder("coder").ack_wait(Duration::from_secs(1)))
        .await;
    // Something that is not a mesh event lands on the coder's subject (only
    // the worker should publish there; a misconfigured client did).
    mesh.js
        .publish("mesh.deliver.coder.planner", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let planner = mesh.agent(Agent::builder("planner")).await;
    let handoff = planner
        .workflow()
        .handoff("coder", "real work")
        .await
        .unwrap();

    let mut deliveries = coder.deliveries().await.unwrap();
    let d = next_delivery(&mut deliveries).await;
    assert_eq!(d.id(), handoff.id);
    d.ack().await.unwrap();
    eventually(WAIT, "the garbage to be settled for good", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_are_not_raced_by_redeliveries_and_tools_stay_served() {
    let mesh = Mesh::with_worker().await;
    let ack_wait = Duration::from_secs(1);
    let tool_runs = Arc::new(AtomicUsize::new(0));
    let coder = mesh
        .agent(
            Agent::builder("coder")
                .ack_wait(ack_wait)
                .tool(ToolSpec::new("tests.run"), {
                    let tool_runs = tool_runs.clone();
                    move |_call: ToolCall| {
                        let tool_runs = tool_runs.clone();
                        async move {
                            tool_runs.fetch_add(1, Ordering::SeqCst);
                            // The tool's work takes several ack waits.
                            tokio::time::sleep(3 * ack_wait).await;
                            Ok(json!({"passed": 1}))
                        }
                    }
                }),
        )
        .await;
    // The handoff's handler works until the test releases it.
    let release = Arc::new(tokio::sync::Notify::new());
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let served = tokio::spawn({
        let (coder, stop, handled, release) = (
            coder.clone(),
            stop.clone(),
            handled.clone(),
            release.clone(),
        );
        async move {
            coder
                .serve_with(stop.cancelled_owned(), move |d: Delivery| {
                    let (handled, release) = (handled.clone(), release.clone());
                    async move {
                        handled.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(d.delivery_count(), 1, "redelivered while being handled");
                        release.notified().await;
                        Ok::<_, String>(())
                    }
                })
                .await
                .unwrap()
        }
    });
    let planner = mesh.agent(Agent::builder("planner")).await;
    let wf = planner.workflow();
    wf.handoff("coder", "slow task").await.unwrap();
    eventually(WAIT, "the handoff's handler to start", || async {
        (handled.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();
    // Served while the handoff is still being worked on.
    let result = wf
        .call_tool("tests.run", json!({}))
        .timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(result, json!({"passed": 1}));
    release.notify_one();
    eventually(WAIT, "the slow handoff to be acknowledged", || async {
        (mesh.backlog("coder").await.unwrap() == (0, 0)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(tool_runs.load(Ordering::SeqCst), 1);
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    stop.cancel();
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_each_get_their_own_answer() {
    let mesh = Mesh::with_worker().await;
    let runs = Runs::default();
    let coder = mesh.agent(code_search_agent(runs.clone())).await;
    let (stop, served) = serve(&coder);
    let planner = mesh.agent(Agent::builder("planner")).await;

    let wfs: Vec<_> = (0..20).map(|_| planner.workflow()).collect();
    let results = futures::future::join_all(wfs.iter().enumerate().map(|(i, wf)| {
        wf.call_tool("code.search", json!({"query": format!("q{i}")}))
            .on("coder")
            .into_future()
    }))
    .await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(
            result.unwrap()["matches"],
            json!([format!("src/parser.rs: fn q{i}")])
        );
    }
    assert_eq!(runs.search.load(Ordering::SeqCst), 20);
    stop.cancel();
    served.await.unwrap();
}

/// A TCP proxy to a NATS server that the test can cut: [`Proxy::cut`]
/// drops every connection through it and refuses new ones until
/// [`Proxy::resume`], so a client behind it is disconnected while the
/// server and everyone else go on.
struct Proxy {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let accepting = tokio::spawn({
            let (open, generation) = (open.clone(), generation.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let cut = generation.lock().unwrap().clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            () = cut.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        }
                    });
                }
            }
        });
        Self {
            port,
            open,
            generation,
            accepting,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let old = std::mem::take(&mut *self.generation.lock().unwrap());
        old.cancel();
    }

    fn resume(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_written_while_the_agent_was_disconnected_is_not_missed() {
    let mut mesh = Mesh::start().await;
    let server: std::net::SocketAddr = mesh.url().trim_start_matches("nats://").parse().unwrap();
    let proxy = Proxy::start(server).await;
    let planner = Agent::connect("planner", proxy.url()).await.unwrap();
    // No policy worker yet: the prompt waits in `MESH_INGRESS`.
    let prompt = planner
        .workflow()
        .prompt("decided while I was away")
        .await
        .unwrap();

    proxy.cut();
    eventually(WAIT, "the planner to notice it is disconnected", || async {
        (planner.client().connection_state() != async_nats::connection::State::Connected)
            .then_some(())
    })
    .await
    .unwrap();
    mesh.start_worker(None).await;
    let decisions = mesh.js.clone();
    eventually(WAIT, "the receipt in `MESH_DECISION`", || {
        let decisions = decisions.clone();
        async move {
            let mut stream = decisions.get_stream(subjects::STREAM_DECISION).await.ok()?;
            (stream.info().await.ok()?.state.messages >= 1).then_some(())
        }
    })
    .await
    .unwrap();
    assert_ne!(
        planner.client().connection_state(),
        async_nats::connection::State::Connected,
        "the receipt was written while the planner was away"
    );

    proxy.resume();
    let receipt = tokio::time::timeout(WAIT, planner.await_decision(&prompt.id).into_future())
        .await
        .expect("no receipt within WAIT")
        .unwrap();
    assert_eq!(receipt.event_id, prompt.id);
    assert_eq!(receipt.decision, Decision::Allow, "{receipt:?}");
    // Read from its durable, and acknowledged there.
    let durable = subjects::receipts_consumer("planner");
    eventually(
        WAIT,
        "the receipt acknowledged in `receipts-planner`",
        || {
            let js = mesh.js.clone();
            let durable = durable.clone();
            async move {
                let info = js
                    .get_stream(subjects::STREAM_DECISION)
                    .await
                    .ok()?
                    .consumer_info(&durable)
                    .await
                    .ok()?;
                (info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.delivered.stream_sequence >= 1)
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
}

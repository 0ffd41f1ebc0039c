//! Operating the policy worker, against a real nats-server and the real
//! binary: `/healthz`, `/readyz` and `/metrics`, JSON logs that name the
//! event and its trace, spans exported over OTLP that join the event's
//! trace, and two replicas sharing one durable consumer.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;

use schemas::{EventBuilder, TraceParent, subjects};
use support::{Mesh, WAIT, event, handoff, policies_copy};
use telemetry::testing::{OtlpReceiver, http_get};
use testkit::{Service, eventually, free_port, sample_value};

/// The `policy-worker` binary with its health server on a port of its own.
struct Worker {
    service: Service,
    addr: SocketAddr,
}

impl Worker {
    /// Starts the binary and waits until `/readyz` answers 200.
    async fn start(
        mesh: &Mesh,
        policies: &std::path::Path,
        extra: &[&str],
        rust_log: &str,
    ) -> Self {
        let port = free_port().unwrap();
        let mut service = Service::spawn(
            Command::new(env!("CARGO_BIN_EXE_policy-worker"))
                .args(["--nats-url", &mesh.nats.url(), "--policies"])
                .arg(policies)
                .args(["--http-port", &port.to_string(), "--http-host", "127.0.0.1"])
                .args(extra)
                .env("RUST_LOG", rust_log)
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env_remove("AGENTMESH_LOG_FORMAT"),
        )
        .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        service
            .wait_until(WAIT, "the worker's /readyz to answer 200", || async move {
                matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("policy-worker exited at start: {e}"));
        Self { service, addr }
    }

    /// The value of one sample on `/metrics` (`name{labels}` as rendered), 0 when absent.
    async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = http_get(self.addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        sample_value(&body, sample)
    }

    fn terminate(&mut self) {
        self.service.signal("TERM").unwrap();
    }
}

/// A `tool.call` of `shell.exec`, which the shipped policies forbid.
fn shell_exec(id: &str, traceparent: &TraceParent) -> schemas::Event {
    event(id, "coder", "tool.call")
        .subject("shell.exec")
        .extension("traceparent", traceparent.to_string())
        .data("application/json", serde_json::json!({"cmd": "rm -rf /"}))
        .build()
        .unwrap()
}

#[tokio::test]
async fn two_replicas_on_one_durable_decide_every_event_exactly_once() {
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    // Small pulls so both replicas keep asking while events arrive.
    let flags = ["--batch", "5", "--max-in-flight", "8"];
    let a = Worker::start(&mesh, policies.path(), &flags, "info").await;
    let b = Worker::start(&mesh, policies.path(), &flags, "info").await;

    const N: usize = 400;
    let mut ids = BTreeSet::new();
    let mut denied = 0;
    for i in 0..N {
        let id = format!("scale-{i:04}");
        if i % 4 == 0 {
            let tp = TraceParent::mint();
            mesh.publish_event(
                &subjects::ingress("coder", "tool_call"),
                &shell_exec(&id, &tp),
            )
            .await
            .unwrap();
            denied += 1;
        } else {
            mesh.publish_event(&subjects::ingress("planner", "handoff"), &handoff(&id))
                .await
                .unwrap();
        }
        ids.insert(id);
    }

    // One receipt per event, each id once.
    let receipts = mesh
        .wait_messages(subjects::STREAM_DECISION, N as u64)
        .await
        .unwrap();
    let mut seen = BTreeMap::new();
    for m in &receipts {
        let r: schemas::DecisionReceipt = serde_json::from_slice(&m.payload).unwrap();
        *seen.entry(r.event_id).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), N, "receipts for {} distinct events", seen.len());
    assert!(seen.values().all(|&n| n == 1), "an event has two receipts");
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), ids);

    // Each event was pulled by exactly one replica, and both did work.
    let received = "agentmesh_worker_events_received_total";
    let (in_a, in_b) = eventually(WAIT, "both replicas' counts to add up to N", || async {
        let (x, y) = (a.metric(received).await, b.metric(received).await);
        (x + y == N as f64).then_some((x, y))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        in_a > 0.0 && in_b > 0.0,
        "one replica did all the work: {in_a} + {in_b}"
    );

    let deny = "agentmesh_worker_decisions_total{decision=\"deny\"}";
    let allow = "agentmesh_worker_decisions_total{decision=\"allow\"}";
    assert_eq!(a.metric(deny).await + b.metric(deny).await, denied as f64);
    assert_eq!(
        a.metric(allow).await + b.metric(allow).await,
        (N - denied) as f64
    );
    let dead = "agentmesh_worker_events_published_total{kind=\"dead\"}";
    assert_eq!(a.metric(dead).await + b.metric(dead).await, denied as f64);
    // Lag is read from the shared consumer's info: both report the same consumer.
    let (_, body) = http_get(a.addr, "/metrics").await.unwrap();
    assert!(
        body.contains(
            "agentmesh_consumer_pending{consumer=\"policy-worker\",stream=\"MESH_INGRESS\"}"
        ),
        "{body}"
    );
    assert!(
        body.contains("agentmesh_worker_evaluation_duration_seconds_count"),
        "{body}"
    );
}

#[tokio::test]
async fn health_follows_nats_and_json_logs_name_the_event_and_its_trace() {
    let mut mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let worker = Worker::start(
        &mesh,
        policies.path(),
        &["--log-format", "json"],
        "info,policy_worker=debug",
    )
    .await;

    assert_eq!(
        http_get(worker.addr, "/healthz").await.unwrap(),
        (200, "ok\n".into())
    );
    let (status, body) = http_get(worker.addr, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "consumer: ok\npolicies: ok\nnats: ok\n");

    let allowed = handoff("json-allowed");
    let tp = TraceParent::mint();
    let denied = shell_exec("json-denied", &tp);
    mesh.publish_event(&subjects::ingress("planner", "handoff"), &allowed)
        .await
        .unwrap();
    mesh.publish_event(&subjects::ingress("coder", "tool_call"), &denied)
        .await
        .unwrap();
    // Not a CloudEvent: invalid, with a trace derived from its id.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-id", "json-invalid");
    mesh.publish(&subjects::ingress("coder", "step"), headers, "x")
        .await
        .unwrap();
    let receipts = [
        mesh.receipt("json-allowed").await.unwrap(),
        mesh.receipt("json-denied").await.unwrap(),
        mesh.receipt("json-invalid").await.unwrap(),
    ];

    let lines = eventually(WAIT, "a log line for each event", || {
        let lines = worker.service.log().lines();
        let receipts = &receipts;
        async move {
            let all = receipts
                .iter()
                .all(|r| lines.iter().any(|l| l.contains(&r.event_id)));
            all.then_some(lines)
        }
    })
    .await
    .unwrap();
    for line in &lines {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            json.get("level").is_some() && json.get("message").is_some(),
            "{line}"
        );
        if json.get("event_id").is_some() {
            assert!(
                json.get("trace_id").is_some(),
                "event line without trace_id: {line}"
            );
        }
    }
    for r in &receipts {
        let line = lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|j| j["event_id"] == r.event_id.as_str())
            .unwrap();
        assert_eq!(line["trace_id"], r.trace_id.as_str(), "{line}");
    }
    assert_eq!(receipts[1].trace_id, tp.trace_id_hex());

    // NATS gone: alive, not ready. Back: ready again.
    mesh.nats.kill();
    let failing = eventually(WAIT, "/readyz to fail without NATS", || async {
        match http_get(worker.addr, "/readyz").await {
            Ok((503, body)) => Some(body),
            _ => None,
        }
    })
    .await
    .unwrap();
    assert!(failing.contains("nats: failing"), "{failing}");
    assert_eq!(http_get(worker.addr, "/healthz").await.unwrap().0, 200);
    mesh.nats.restart().await.unwrap();
    eventually(WAIT, "/readyz to pass once NATS is back", || async {
        matches!(http_get(worker.addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn decision_and_delivery_spans_join_the_agents_trace_over_otlp() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let endpoint = receiver.endpoint();
    let mut worker = Worker::start(
        &mesh,
        policies.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-metrics-interval-ms",
            "200",
        ],
        "info",
    )
    .await;

    // The agent's span that published the event: its trace, its span id.
    let agent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    let allowed = handoff("otel-allowed");
    assert_eq!(
        allowed.extension("traceparent").unwrap().to_string(),
        agent.to_string()
    );
    let denier = TraceParent::mint();
    mesh.publish_event(&subjects::ingress("planner", "handoff"), &allowed)
        .await
        .unwrap();
    mesh.publish_event(
        &subjects::ingress("coder", "tool_call"),
        &shell_exec("otel-denied", &denier),
    )
    .await
    .unwrap();
    mesh.receipt("otel-allowed").await.unwrap();
    mesh.receipt("otel-denied").await.unwrap();

    let span_of = |event_id: &'static str| {
        let receiver = &receiver;
        async move {
            eventually(
                WAIT,
                &format!("the decision span of `{event_id}`"),
                || async {
                    receiver.spans().into_iter().find(|s| {
                        s.name == "policy.decision"
                            && s.attributes.get("event_id").map(String::as_str) == Some(event_id)
                    })
                },
            )
            .await
            .unwrap()
        }
    };
    let decision = span_of("otel-allowed").await;
    assert_eq!(decision.service, "policy-worker");
    assert_eq!(decision.trace_id, agent.trace_id_hex());
    assert_eq!(decision.parent_span_id, agent.parent_id_hex());
    assert_eq!(decision.attributes["decision"], "allow");
    assert_eq!(decision.attributes["trace_id"], agent.trace_id_hex());
    let delivery = eventually(WAIT, "the delivery span", || async {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.name == "policy.delivery" && s.parent_span_id == decision.span_id)
    })
    .await
    .unwrap();
    assert_eq!(delivery.trace_id, agent.trace_id_hex());

    let denied = span_of("otel-denied").await;
    assert_eq!(denied.trace_id, denier.trace_id_hex());
    assert_eq!(denied.parent_span_id, denier.parent_id_hex());
    assert_eq!(denied.attributes["decision"], "deny");

    // An event parked for a human: its release, whenever the answer comes,
    // is a `policy.approval` span under the event's decision span.
    let deployer = TraceParent::mint();
    let deploy = event("otel-parked", "coder", "tool.call")
        .subject("deploy.prod")
        .extension("traceparent", deployer.to_string())
        .data("application/json", serde_json::json!({"release": "v2"}))
        .build()
        .unwrap();
    mesh.publish_event(&subjects::ingress("coder", "tool_call"), &deploy)
        .await
        .unwrap();
    let parked = span_of("otel-parked").await;
    assert_eq!(parked.trace_id, deployer.trace_id_hex());
    let approval_id = schemas::approval::approval_id("coder", "otel-parked");
    let kv = mesh
        .js
        .get_key_value(subjects::BUCKET_APPROVALS)
        .await
        .unwrap();
    let state: schemas::approval::ApprovalState =
        eventually(WAIT, "the approval request", || async {
            serde_json::from_slice(&kv.get(&approval_id).await.ok()??).ok()
        })
        .await
        .unwrap();
    assert_eq!(
        state.decision_span,
        format!("00-{}-{}-01", deployer.trace_id_hex(), parked.span_id),
        "the parked state keeps the decision span's context"
    );
    // It has no `target`: answered, it gets a receipt and nothing else.
    const RECEIPTS: &str = "agentmesh_worker_events_published_total{kind=\"receipt\"}";
    const PARKED: &str = "agentmesh_worker_events_published_total{kind=\"parked\"}";
    assert_eq!(worker.metric(PARKED).await, 1.0);
    let receipts_before = worker.metric(RECEIPTS).await;
    broker_config::admin::send_answer(
        &mesh.js,
        "coder",
        &schemas::approval::Answer {
            id: approval_id.clone(),
            action: schemas::approval::AnswerAction::Approve,
            approver: "ops-oncall".into(),
            comment: "release window".into(),
            at: chrono::Utc::now().to_rfc3339(),
        },
    )
    .await
    .unwrap();
    let released = mesh.receipt("otel-parked").await.unwrap();
    assert_eq!(released.decision, schemas::Decision::Allow);
    // The release's receipt is counted once it is stored.
    eventually(WAIT, "the release's receipt counted", || async {
        (worker.metric(RECEIPTS).await == receipts_before + 1.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(worker.metric(PARKED).await, 1.0);
    let approval = eventually(WAIT, "the approval span", || async {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.name == "policy.approval" && s.parent_span_id == parked.span_id)
    })
    .await
    .unwrap();
    assert_eq!(approval.trace_id, deployer.trace_id_hex());
    assert_eq!(approval.attributes["approval_status"], "approved");
    assert_eq!(approval.attributes["approval_id"], approval_id);

    // The same instruments reach the collector over OTLP.
    let point = eventually(WAIT, "worker metrics over OTLP", || async {
        receiver
            .points()
            .into_iter()
            .find(|p| p.metric == "agentmesh.worker.events.received" && p.value >= 2.0)
    })
    .await
    .unwrap();
    assert_eq!(point.service, "policy-worker");

    // A graceful stop flushes what is left and exits cleanly.
    worker.terminate();
    let mut worker = worker;
    let status = worker.service.wait_exit(WAIT).await.unwrap();
    assert!(status.success(), "{}", worker.service.log_text());
}

/// At start the worker reads each NATS node's durability from its `/varz`:
/// the harness's server fsyncs every write (`sync_interval: always`, the
/// stack's default), a second one flushes every 2 minutes and a third
/// address answers nothing. The gauge says 1 and 0, the log warns about the
/// second and says the third's is unknown.
#[tokio::test]
async fn reports_whether_each_nats_node_fsyncs_every_write() {
    let mesh = Mesh::start().await.unwrap();
    let lazy = testkit::NatsServer::start_with(testkit::Store {
        sync_interval: Some("2m".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let silent = format!("http://127.0.0.1:{}", free_port().unwrap());
    let read = |url: String| async move {
        broker_config::server::read_node_sync(&url, std::time::Duration::from_secs(5))
            .await
            .unwrap()
    };
    let always = read(mesh.nats.monitoring_url()).await;
    let interval = read(lazy.monitoring_url()).await;
    assert!(always.sync_always && !interval.sync_always);
    assert_eq!(interval.describe(), "interval 120s");

    let policies = policies_copy();
    let urls = [
        mesh.nats.monitoring_url(),
        lazy.monitoring_url(),
        silent.clone(),
    ]
    .join(",");
    let worker = Worker::start(
        &mesh,
        policies.path(),
        &["--nats-monitoring-url", &urls],
        "info",
    )
    .await;
    let (_, body) = http_get(worker.addr, "/metrics").await.unwrap();
    for (node, value) in [(&always, 1), (&interval, 0)] {
        let sample = format!(
            "agentmesh_nats_sync_always{{server=\"{}\"}} {value}",
            node.server_name
        );
        assert!(body.lines().any(|l| l == sample), "{sample} not in\n{body}");
    }
    assert_eq!(
        body.matches("agentmesh_nats_sync_always{").count(),
        2,
        "{body}"
    );
    let log = worker.service.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("does not fsync each write"))
        .unwrap_or_else(|| panic!("no warning in\n{log}"));
    assert!(
        warning.contains(&interval.server_name) && warning.contains("interval 120s"),
        "{warning}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("durability unknown") && l.contains(&silent)),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("does not fsync") && l.contains(&always.server_name)),
        "{log}"
    );
}

/// A node that comes back with the tail of a message block gone (a disk
/// that lost it, a torn write): nats-server 2.15 restores the records
/// before the damage, says only `Restored N messages` and hands the lost
/// sequences out again, and the stream's info marks nothing lost. The
/// worker, still running, finds that `MESH_DELIVER` no longer holds the
/// last delivery it stored there: an error log that names the stream, and
/// `agentmesh_worker_stream_losses_total{stream}`. It keeps its own
/// guarantee after the restart: events published then are acked only once
/// their receipt and delivery are stored.
#[tokio::test]
async fn a_stream_back_with_a_truncated_block_is_reported_not_passed_over() {
    const BEFORE: u64 = 40;
    const AFTER: u64 = 10;
    let mut mesh = Mesh::start().await.unwrap();
    let policies = policies_copy();
    let worker = Worker::start(&mesh, policies.path(), &[], "info").await;
    let losses = "agentmesh_worker_stream_losses_total{stream=\"MESH_DELIVER\"}";
    for i in 0..BEFORE {
        mesh.publish_event(
            &subjects::ingress("planner", "handoff"),
            &handoff(&format!("before-{i}")),
        )
        .await
        .unwrap();
    }
    mesh.wait_messages(subjects::STREAM_DELIVER, BEFORE)
        .await
        .unwrap();
    // Every event acked: the worker stored its receipt and its delivery.
    all_acked(&mesh).await;
    assert_eq!(worker.metric(losses).await, 0.0);

    // The node stops (its consumers' state written, so nothing acked comes
    // back as a redelivery that would store the copy again); its disk
    // loses the second half of the stream's last block; the node starts on
    // what is left.
    mesh.nats.stop().await.unwrap();
    let blocks = mesh.nats.stream_blocks(subjects::STREAM_DELIVER).unwrap();
    let sizes: Vec<u64> = blocks
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .collect();
    let (last, size) = blocks
        .iter()
        .zip(&sizes)
        .rfind(|(_, size)| **size > 0)
        .unwrap_or_else(|| panic!("MESH_DELIVER has no message block with data: {blocks:?}"));
    let file = std::fs::OpenOptions::new().write(true).open(last).unwrap();
    file.set_len(size / 2).unwrap();
    drop(file);
    mesh.nats.start_again().await.unwrap();

    // What the server reports: fewer messages restored, and no warning or
    // error about it.
    let log = std::fs::read_to_string(mesh.nats.log_path()).unwrap();
    let restart = &log[log.rfind("Starting nats-server").unwrap()..];
    let restored: u64 = restart
        .lines()
        .find_map(|l| {
            l.split("Restored ")
                .nth(1)?
                .split_once(" messages for stream '$G > MESH_DELIVER'")
                .map(|(n, _)| n.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no `Restored … MESH_DELIVER` line in\n{restart}"));
    assert!(
        restored < BEFORE,
        "the truncation of {} ({size} bytes, blocks {sizes:?}) cost nothing: {restored} restored",
        last.display()
    );
    let complaints: Vec<&str> = restart
        .lines()
        .filter(|l| l.contains("[WRN]") || l.contains("[ERR]"))
        .collect();
    println!(
        "nats-server after the truncation: restored {restored} of {BEFORE} messages of MESH_DELIVER; warnings and errors: {complaints:?}"
    );

    // What the worker reports.
    eventually(WAIT, "the worker to report the loss", || async {
        (worker.metric(losses).await >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let log = worker.service.log_text();
    let error = log
        .lines()
        .find(|l| l.contains("Stream `MESH_DELIVER` lost messages it had acknowledged"))
        .unwrap_or_else(|| panic!("no error in\n{log}"));
    println!("the worker: {error}");
    assert!(error.contains("ERROR"), "{error}");
    assert!(
        !log.lines()
            .any(|l| l.contains("lost messages") && !l.contains("MESH_DELIVER")),
        "a stream that lost nothing reported:\n{log}"
    );

    // After the restart the worker stores before it acks, as before: each
    // new event's receipt and delivery are there once it is acked.
    for i in 0..AFTER {
        mesh.publish_event(
            &subjects::ingress("planner", "handoff"),
            &handoff(&format!("after-{i}")),
        )
        .await
        .unwrap();
    }
    all_acked(&mesh).await;
    let deliveries = mesh.messages(subjects::STREAM_DELIVER).await.unwrap();
    let receipts = mesh.receipts().await.unwrap();
    let delivered = |id: &str| {
        deliveries
            .iter()
            .any(|m| support::header(&m.headers, "ce-id").as_deref() == Some(id))
    };
    // The acknowledged events the truncation cost their delivery: lost,
    // and reported above, not in silence.
    let lost = (0..BEFORE)
        .filter(|i| !delivered(&format!("before-{i}")))
        .count() as u64;
    println!("acknowledged events whose delivery is gone: {lost} of {BEFORE}");
    assert_eq!(lost, BEFORE - restored);
    for i in 0..AFTER {
        let id = format!("after-{i}");
        assert!(delivered(&id), "no delivery for {id}");
        assert!(
            receipts.iter().any(|r| r.event_id == id),
            "no receipt for {id}"
        );
    }
    // One report per loss: the new deliveries set a new mark.
    assert_eq!(worker.metric(losses).await, 1.0);
}

/// Waits until the worker acked every event published so far.
async fn all_acked(mesh: &Mesh) {
    eventually(WAIT, "the worker to ack every event", || async {
        let info = mesh
            .stream(subjects::STREAM_INGRESS)
            .await
            .ok()?
            .consumer_info("policy-worker")
            .await
            .ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await
    .unwrap();
}

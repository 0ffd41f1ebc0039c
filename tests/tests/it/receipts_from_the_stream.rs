//! Receipts are read from `MESH_DECISION`, each agent through its own
//! durable `receipts-<id>`, on a nats-server running the config
//! `broker-config` renders: the agent reads (and acks) its own receipts
//! there, with the Rust client and with the README's nats-py script, and
//! cannot bend that consumer to another agent's receipts, make one for
//! another agent, or pull from the services' consumers.

use std::path::Path;
use std::process::Command;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use broker_config::auth::{ADMIN, POLICY_WORKER};
use e2e::{SecureNats, WAIT, jetstream as js_of, start_worker};
use futures::{FutureExt as _, StreamExt as _};
use testkit::eventually;

const STREAM: &str = "MESH_DECISION";

/// A handoff from the planner to the coder; returns its id.
async fn publish_handoff(js: &jetstream::Context) -> anyhow::Result<String> {
    let id = uuid::Uuid::now_v7().to_string();
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", id.as_str()),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.task.handoff"),
        ("ce-target", "coder"),
        ("ce-datacontenttype", "application/json"),
    ] {
        headers.insert(k, v);
    }
    js.publish_with_headers(
        "mesh.ingress.planner.handoff",
        headers,
        "{\"task\":\"write the parser\"}".into(),
    )
    .await?
    .await?;
    Ok(id)
}

/// Pulls from `receipts` until the receipt of `event_id`, acking each one.
async fn receipt_of(
    receipts: &consumer::PullConsumer,
    event_id: &str,
) -> anyhow::Result<serde_json::Value> {
    eventually(WAIT, &format!("the receipt of `{event_id}`"), || async {
        let mut batch = receipts.fetch().max_messages(10).messages().await.ok()?;
        let mut found = None;
        while let Some(Ok(msg)) = batch.next().await {
            let receipt: serde_json::Value = serde_json::from_slice(&msg.payload).ok()?;
            msg.double_ack().await.ok()?;
            if receipt["event_id"] == event_id {
                found = Some(receipt);
            }
        }
        found
    })
    .await
}

/// Unread and unacknowledged messages of consumer `name`.
async fn pending(js: &jetstream::Context, stream: &str, name: &str) -> anyhow::Result<u64> {
    let info = js.get_stream(stream).await?.consumer_info(name).await?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}

/// Sends a request to `subject` and waits for the server's permissions
/// violation; checks that nothing answered it.
async fn refused(
    client: &async_nats::Client,
    events: &e2e::Events,
    subject: &str,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject.to_owned(), inbox, body.into())
        .await?;
    client.flush().await?;
    eventually(
        WAIT,
        &format!("a permissions violation for `{subject}`"),
        || async { events.violation(subject).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; events: {:?}", events.all()))?;
    assert!(
        answers.next().now_or_never().flatten().is_none(),
        "the server answered `{subject}`"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reads_its_receipts_from_the_stream() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "coder"]).await?;
    let worker = start_worker(&mesh).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (planner, events) = mesh.connect_as("planner").await?;
    let js = js_of(planner.clone());

    // The planner's own create request for its receipts durable (the
    // operator made it; this is the update that changes nothing).
    let receipts: consumer::PullConsumer = js
        .create_consumer_on_stream(broker_config::receipts_consumer_config("planner"), STREAM)
        .await?;
    let id = publish_handoff(&js).await?;
    let receipt = receipt_of(&receipts, &id).await?;
    assert_eq!(receipt["decision"], "allow", "{receipt}");
    assert_eq!(receipt["agent"], "planner", "{receipt}");
    assert_eq!(pending(&admin, STREAM, "receipts-planner").await?, 0);

    // The worker publishing a receipt again (a redelivered ingress event)
    // reaches a core subscriber twice and the stream once.
    let mut core = planner.subscribe("mesh.decision.planner").await?;
    planner.flush().await?;
    let worker_js = mesh.jetstream(POLICY_WORKER).await?;
    let again = format!("{{\"event_id\":\"{id}-again\"}}");
    for _ in 0..2 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("planner/{id}-again").as_str());
        worker_js
            .publish_with_headers("mesh.decision.planner", headers, again.clone().into())
            .await?
            .await?;
    }
    for _ in 0..2 {
        let seen = tokio::time::timeout(WAIT, core.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the core subscription ended"))?;
        assert_eq!(seen.payload, again.as_bytes());
    }
    // Both publishes were acknowledged, so the stream holds all it will:
    // a batch that does not wait returns the one stored copy.
    let mut batch = receipts.fetch().max_messages(10).messages().await?;
    let mut read = Vec::new();
    while let Some(msg) = batch.next().await {
        let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
        msg.double_ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        read.push(String::from_utf8_lossy(&msg.payload).into_owned());
    }
    assert_eq!(read, [again]);
    assert!(events.all().is_empty(), "{:?}", events.all());
    worker.cancel();
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_read_other_receipts_or_the_services_consumers() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "coder"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let worker = mesh.jetstream(POLICY_WORKER).await?;
    for agent in ["coder", "planner"] {
        let receipt = format!("{{\"event_id\":\"{agent}-1\",\"decision\":\"allow\"}}");
        worker
            .publish(format!("mesh.decision.{agent}"), receipt.into())
            .await?
            .await?;
    }
    let (planner, events) = mesh.connect_as("planner").await?;

    let create = |name: &str, filter: &str| {
        serde_json::to_vec(&serde_json::json!({
            "stream_name": STREAM,
            "config": {
                "name": name, "durable_name": name, "filter_subject": filter,
                "ack_policy": "explicit", "deliver_policy": "all",
            },
        }))
    };
    let next = serde_json::to_vec(&serde_json::json!({"batch": 10, "no_wait": true}))?;
    let attempts = [
        // Its own consumer's name with another agent's filter, or none.
        (
            "$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-planner.mesh.decision.coder",
            create("receipts-planner", "mesh.decision.coder")?,
        ),
        (
            "$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-planner.mesh.decision.>",
            create("receipts-planner", "mesh.decision.>")?,
        ),
        (
            "$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-planner",
            create("receipts-planner", "mesh.decision.coder")?,
        ),
        (
            "$JS.API.CONSUMER.DURABLE.CREATE.MESH_DECISION.receipts-planner",
            create("receipts-planner", "mesh.decision.coder")?,
        ),
        // Another agent's consumer.
        (
            "$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-coder.mesh.decision.coder",
            create("receipts-coder", "mesh.decision.coder")?,
        ),
        (
            "$JS.API.CONSUMER.MSG.NEXT.MESH_DECISION.receipts-coder",
            next.clone(),
        ),
        ("$JS.API.CONSUMER.INFO.MESH_DECISION.receipts-coder", vec![]),
        (
            "$JS.API.CONSUMER.DELETE.MESH_DECISION.receipts-coder",
            vec![],
        ),
        // The services' consumers.
        (
            "$JS.API.CONSUMER.MSG.NEXT.MESH_DECISION.audit-sink-decisions",
            next.clone(),
        ),
        (
            "$JS.API.CONSUMER.CREATE.MESH_DECISION.audit-sink-decisions",
            create("audit-sink-decisions", "mesh.decision.>")?,
        ),
        (
            "$JS.API.CONSUMER.MSG.NEXT.MESH_INGRESS.policy-worker",
            next.clone(),
        ),
        // Its own, deleted so that it could be created again as a push
        // consumer.
        (
            "$JS.API.CONSUMER.DELETE.MESH_DECISION.receipts-planner",
            vec![],
        ),
    ];
    for (subject, body) in attempts {
        refused(&planner, &events, subject, body).await?;
    }

    // Through the one create subject it may use, JetStream refuses a body
    // that differs from it in filter, or that makes the consumer push.
    let pinned = "$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-planner.mesh.decision.planner";
    let mut push = serde_json::to_value(broker_config::receipts_consumer_config("planner"))?;
    push["deliver_subject"] = "mesh.deliver.coder.planner".into();
    for body in [
        create("receipts-planner", "mesh.decision.coder")?,
        serde_json::to_vec(&serde_json::json!({"stream_name": STREAM, "config": push}))?,
    ] {
        let answer = planner.request(pinned, body.into()).await?;
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
        assert!(answer["error"].is_object(), "{answer}");
    }
    // The client API says the same.
    let mut others = broker_config::receipts_consumer_config("planner");
    others.filter_subject = "mesh.decision.coder".into();
    let js = js_of(planner.clone());
    assert!(
        js.create_consumer_on_stream(others, STREAM).await.is_err(),
        "the planner's consumer was turned to the coder's receipts"
    );

    // Nothing was consumed or changed: the coder's receipt and the sink's
    // two still wait, and the planner's consumer is as the operator made it.
    assert_eq!(pending(&admin, STREAM, "receipts-coder").await?, 1);
    assert_eq!(pending(&admin, STREAM, "audit-sink-decisions").await?, 2);
    let decisions = admin.get_stream(STREAM).await?;
    let mut names: Vec<String> = decisions
        .consumer_names()
        .filter_map(|n| async { n.ok() })
        .collect()
        .await;
    names.sort();
    assert_eq!(
        names,
        [
            "audit-chain",
            "audit-sink-decisions",
            "receipts-coder",
            "receipts-planner"
        ]
    );
    let own = decisions.consumer_info("receipts-planner").await?;
    assert_eq!(own.config.filter_subject, "mesh.decision.planner");
    assert!(own.config.deliver_subject.is_none());

    // Its own receipts it reads.
    let receipts: consumer::PullConsumer = js
        .create_consumer_on_stream(broker_config::receipts_consumer_config("planner"), STREAM)
        .await?;
    let receipt = receipt_of(&receipts, "planner-1").await?;
    assert_eq!(receipt["decision"], "allow");
    Ok(())
}

fn python() -> String {
    testkit::python()
}

/// Runs the README's example script with `args`; its stdout.
fn run_example(args: Vec<String>) -> anyhow::Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/publish_event.py");
    let probe = Command::new(python())
        .args(["-c", "import nats, nkeys"])
        .output();
    anyhow::ensure!(
        probe.is_ok_and(|o| o.status.success()),
        "this test needs python3 with nats-py and nkeys: run `scripts/install-deps.sh` (into .agentmesh/venv) or set AGENTMESH_PYTHON"
    );
    let out = Command::new(python()).arg(script).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_reads_its_receipt_with_the_planners_key() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "coder"]).await?;
    let worker = start_worker(&mesh).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    // An earlier receipt waits in the planner's consumer: the script skips it.
    let planner = js_of(mesh.connect_as("planner").await?.0);
    publish_handoff(&planner).await?;
    eventually(WAIT, "the earlier receipt to be stored", || async {
        let pending = pending(&admin, STREAM, "receipts-planner").await.ok()?;
        (pending == 1).then_some(())
    })
    .await?;

    let seed = mesh.seed_file("planner")?.display().to_string();
    let base = vec![
        "--nats-url".to_owned(),
        mesh.url(),
        "--nkey-seed".into(),
        seed,
    ];
    let args = base.clone();
    let out = tokio::task::spawn_blocking(move || run_example(args)).await??;
    assert!(out.contains("\"decision\": \"allow\""), "{out}");
    assert!(out.contains("delivered copy not read"), "{out}");
    // Both receipts were read and acknowledged.
    eventually(WAIT, "both receipts to be acknowledged", || async {
        let pending = pending(&admin, STREAM, "receipts-planner").await.ok()?;
        (pending == 0).then_some(())
    })
    .await?;

    let mut args = base;
    args.extend(["--tool".to_owned(), "shell.exec".to_owned()]);
    let out = tokio::task::spawn_blocking(move || run_example(args)).await??;
    assert!(out.contains("\"decision\": \"deny\""), "{out}");
    assert!(out.contains("forbid-shell-exec"), "{out}");
    worker.cancel();
    Ok(())
}

//! Attempts to get around the broker's permissions, each against a real
//! nats-server running the config `broker-config` renders. Every attempt
//! must draw the server's permission error (or JetStream's refusal) and
//! leave the target untouched: no stored message, no consumed delivery, no
//! changed card, no lost stream.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use broker_config::auth::{ADMIN, AUDIT_SINK, GPU_SCALER, POLICY_WORKER};
use e2e::{SecureNats, WAIT, jetstream as js_of};
use futures::{FutureExt as _, StreamExt as _};
use testkit::eventually;

/// A well-formed event claiming to come from the planner, for the coder.
fn forged_event() -> (HeaderMap, bytes::Bytes) {
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "0190b4b2-0000-7000-8000-000000000001"),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.task.handoff"),
        ("ce-target", "coder"),
        ("ce-datacontenttype", "application/json"),
    ] {
        headers.insert(k, v);
    }
    (
        headers,
        bytes::Bytes::from_static(b"{\"task\":\"rm -rf /\"}"),
    )
}

async fn messages(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

async fn pending(js: &jetstream::Context, stream: &str, consumer: &str) -> anyhow::Result<u64> {
    let info = js.get_stream(stream).await?.consumer_info(consumer).await?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}

/// Waits until `events` holds a permissions violation naming `subject`.
async fn violation(events: &e2e::Events, subject: &str) -> anyhow::Result<()> {
    reported(events, subject, e2e::Events::violation).await
}

/// Waits until `events` holds a refused subscription to `subject`.
async fn subscription_refused(events: &e2e::Events, subject: &str) -> anyhow::Result<()> {
    reported(events, subject, e2e::Events::subscription_violation).await
}

async fn reported(
    events: &e2e::Events,
    subject: &str,
    found: fn(&e2e::Events, &str) -> bool,
) -> anyhow::Result<()> {
    eventually(
        WAIT,
        &format!("a permissions violation for `{subject}`"),
        || async { found(events, subject).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; events: {:?}", events.all()))
}

/// Sends a request to `subject` and waits for the server to refuse it;
/// checks that no answer came back.
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
    violation(events, subject).await?;
    // The server dropped the request, so nothing answered it.
    assert!(
        answers.next().now_or_never().flatten().is_none(),
        "the server answered `{subject}`"
    );
    Ok(())
}

/// The policy worker's identity publishes one delivery for `target` (what
/// a real approval would do) and waits for JetStream to store it.
async fn deliver_as_worker(mesh: &SecureNats, target: &str) -> anyhow::Result<()> {
    let worker = mesh.jetstream(POLICY_WORKER).await?;
    let (headers, payload) = forged_event();
    worker
        .publish_with_headers(format!("mesh.deliver.{target}.planner"), headers, payload)
        .await?
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_publish_to_another_agents_deliveries() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (mallory, events) = mesh.connect_as("mallory").await?;
    let (headers, payload) = forged_event();

    // Core publish, and a JetStream publish that waits for a stored ack.
    let subject = "mesh.deliver.coder.mallory";
    mallory
        .publish_with_headers(subject, headers.clone(), payload.clone())
        .await?;
    mallory.flush().await?;
    violation(&events, subject).await?;
    let js = js_of(mallory.clone());
    let stored = js
        .publish_with_headers("mesh.deliver.coder.planner", headers, payload)
        .await?
        .await;
    assert!(stored.is_err(), "JetStream stored a forged delivery");
    violation(&events, "mesh.deliver.coder.planner").await?;

    assert_eq!(messages(&admin, "MESH_DELIVER").await?, 0);
    assert_eq!(pending(&admin, "MESH_DELIVER", "agent-coder").await?, 0);
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_smuggle_server_answers_into_another_agents_subjects() -> anyhow::Result<()>
{
    let mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (mallory, events) = mesh.connect_as("mallory").await?;
    // Mallory's own card carries a forged event in its headers; her own
    // deliveries hold a real one. She may read both...
    let (headers, payload) = forged_event();
    mallory
        .request_with_headers("$KV.mesh-agents.mallory", headers, payload)
        .await?;
    deliver_as_worker(&mesh, "mallory").await?;
    let before_deliver = messages(&admin, "MESH_DELIVER").await?;
    let before_ingress = messages(&admin, "MESH_INGRESS").await?;
    let before_decision = messages(&admin, "MESH_DECISION").await?;

    // ...and names other agents' subjects as the reply of requests she may
    // make: the server answers to the reply subject, which in a shared
    // account would be stored by the stream listening there.
    // `no_wait`: with no message left the server answers a pull at once
    // (404) rather than when a wait expires, so the pulls are answered by
    // the time her own pull below is.
    let next = serde_json::to_vec(&serde_json::json!({"batch": 1, "no_wait": true}))?;
    for reply in [
        "mesh.deliver.coder.mallory",
        "mesh.ingress.coder.step",
        "mesh.decision.coder",
        "$KV.mesh-agents.coder",
    ] {
        let requests: [(&str, Vec<u8>); 4] = [
            (
                "$JS.API.DIRECT.GET.KV_mesh-agents.$KV.mesh-agents.mallory",
                vec![],
            ),
            ("$JS.API.STREAM.INFO.KV_mesh-agents", vec![]),
            ("mesh.ingress.mallory.step", b"{}".to_vec()),
            (
                "$JS.API.CONSUMER.MSG.NEXT.MESH_DELIVER.agent-mallory",
                next.clone(),
            ),
        ];
        for (subject, body) in requests {
            mallory
                .publish_with_reply(subject, reply, body.into())
                .await?;
        }
    }
    mallory.flush().await?;
    // The same kinds of request answered to her own inbox: once these are
    // back, the server has answered the ones above.
    mallory
        .request(
            "$JS.API.DIRECT.GET.KV_mesh-agents.$KV.mesh-agents.mallory",
            "".into(),
        )
        .await?;
    mallory
        .request("$JS.API.STREAM.INFO.KV_mesh-agents", "".into())
        .await?;
    // A pull is answered with her delivery (whose subject is not the inbox,
    // so not through `request`) or, none left, at once with a 404.
    let inbox = mallory.new_inbox();
    let mut pulled = mallory.subscribe(inbox.clone()).await?;
    mallory
        .publish_with_reply(
            "$JS.API.CONSUMER.MSG.NEXT.MESH_DELIVER.agent-mallory",
            inbox,
            next.into(),
        )
        .await?;
    tokio::time::timeout(WAIT, pulled.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no answer to her own pull"))?;
    // A marker through the legitimate path, stored after the answers.
    deliver_as_worker(&mesh, "coder").await?;

    // Only her own ingress publishes (4) and the marker were stored.
    assert_eq!(messages(&admin, "MESH_INGRESS").await?, before_ingress + 4);
    assert_eq!(messages(&admin, "MESH_DELIVER").await?, before_deliver + 1);
    assert_eq!(messages(&admin, "MESH_DECISION").await?, before_decision);
    assert_eq!(pending(&admin, "MESH_DELIVER", "agent-coder").await?, 1);
    let coder_card = admin
        .get_key_value("mesh-agents")
        .await?
        .get("coder")
        .await?;
    assert!(coder_card.is_none(), "{coder_card:?}");
    assert!(
        !events.all().iter().any(|e| e.contains("Violation")),
        "{:?}",
        events.all()
    );
    Ok(())
}

/// The control for the test above: the same trick against the naive setup
/// (one account, the same user permissions) does land a forged event in
/// the victim's deliveries. This is why agents get accounts of their own.
#[tokio::test]
async fn the_same_trick_works_in_a_shared_account() -> anyhow::Result<()> {
    let binary = testkit::nats_server_binary()?;
    let dir = tempfile::tempdir()?;
    let port = testkit::free_port()?;
    let admin_key = broker_config::credentials::generate_user_key()?;
    let mallory_key = broker_config::credentials::generate_user_key()?;
    let mallory_grants = broker_config::auth::grants(&broker_config::auth::Principal::agent(
        "mallory",
        &mallory_key.public_key,
    ));
    let config = serde_json::json!({
        "listen": format!("127.0.0.1:{port}"),
        "jetstream": {"store_dir": dir.path().join("js").display().to_string()},
        "authorization": {"users": [
            {"nkey": admin_key.public_key},
            {"nkey": mallory_key.public_key, "permissions": {
                "publish": {"allow": mallory_grants.publish},
                "subscribe": {"allow": mallory_grants.subscribe},
            }},
        ]},
    });
    let path = dir.path().join("naive.conf");
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    let mut child = std::process::Command::new(binary)
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let url = format!("nats://127.0.0.1:{port}");
    let result = async {
        let admin = eventually(WAIT, "the naive server", || async {
            async_nats::ConnectOptions::new()
                .nkey(admin_key.seed.clone())
                .connect(&url)
                .await
                .ok()
        })
        .await?;
        let admin = js_of(admin);
        broker_config::apply(&admin, &broker_config::Options::default()).await?;
        let mallory = async_nats::ConnectOptions::new()
            .nkey(mallory_key.seed.clone())
            .connect(&url)
            .await?;
        let (headers, payload) = forged_event();
        mallory
            .request_with_headers("$KV.mesh-agents.mallory", headers, payload)
            .await?;
        mallory
            .publish_with_reply(
                "$JS.API.DIRECT.GET.KV_mesh-agents.$KV.mesh-agents.mallory",
                "mesh.deliver.coder.mallory",
                "".into(),
            )
            .await?;
        mallory.flush().await?;
        let stored = eventually(WAIT, "the smuggled answer in MESH_DELIVER", || async {
            let stream = admin.get_stream("MESH_DELIVER").await.ok()?;
            stream
                .get_last_raw_message_by_subject("mesh.deliver.coder.mallory")
                .await
                .ok()
        })
        .await?;
        let source = stored
            .headers
            .get("ce-source")
            .map(|v| v.as_str().to_owned());
        anyhow::Ok(source)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(result?.as_deref(), Some("/agents/planner"));
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_publish_as_another_agent() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["planner", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (mallory, events) = mesh.connect_as("mallory").await?;
    let (headers, payload) = forged_event();
    let subject = "mesh.ingress.planner.handoff";
    mallory
        .publish_with_headers(subject, headers.clone(), payload.clone())
        .await?;
    mallory.flush().await?;
    violation(&events, subject).await?;
    let stored = js_of(mallory.clone())
        .publish_with_headers(subject, headers, payload)
        .await?
        .await;
    assert!(stored.is_err());
    assert_eq!(messages(&admin, "MESH_INGRESS").await?, 0);

    // Her own subject works: the broker binds the subject token to her key.
    let ack = js_of(mallory)
        .publish("mesh.ingress.mallory.step", "{}".into())
        .await?
        .await?;
    assert_eq!(ack.stream, "MESH_INGRESS");
    assert_eq!(messages(&admin, "MESH_INGRESS").await?, 1);
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_read_another_agents_deliveries_or_receipts() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (mallory, events) = mesh.connect_as("mallory").await?;
    let (coder, _) = mesh.connect_as("coder").await?;
    let mut coder_live = coder.subscribe("mesh.deliver.coder.>").await?;
    coder.flush().await?;

    let mut attempts = Vec::new();
    for subject in ["mesh.deliver.coder.>", "mesh.decision.coder", "mesh.>", ">"] {
        attempts.push((subject, mallory.subscribe(subject).await?));
    }
    mallory.flush().await?;
    for (subject, _) in &attempts {
        subscription_refused(&events, subject).await?;
    }

    deliver_as_worker(&mesh, "coder").await?;
    let worker = mesh.jetstream(POLICY_WORKER).await?;
    worker
        .publish("mesh.decision.coder", "{\"decision\":\"allow\"}".into())
        .await?
        .await?;
    // The coder sees its delivery; the denied subscriptions saw nothing.
    tokio::time::timeout(WAIT, coder_live.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no live delivery for the coder"))?;
    for (subject, sub) in &mut attempts {
        assert!(
            sub.next().now_or_never().flatten().is_none(),
            "mallory read {subject}"
        );
    }

    // Pulling from the coder's durable, or making a consumer of her own on
    // the coder's subjects, is refused.
    let next = serde_json::to_vec(&serde_json::json!({"batch": 10, "no_wait": true}))?;
    let create = |stream: &str, filter: &str| {
        serde_json::to_vec(&serde_json::json!({
            "stream_name": stream,
            "config": {"name": "peek", "filter_subject": filter, "ack_policy": "none"},
        }))
    };
    for (subject, body) in [
        (
            "$JS.API.CONSUMER.MSG.NEXT.MESH_DELIVER.agent-coder".to_owned(),
            next,
        ),
        (
            "$JS.API.CONSUMER.CREATE.MESH_DELIVER.peek.mesh.deliver.coder.>".to_owned(),
            create("MESH_DELIVER", "mesh.deliver.coder.>")?,
        ),
        (
            "$JS.API.CONSUMER.CREATE.MESH_DELIVER".to_owned(),
            create("MESH_DELIVER", "mesh.deliver.coder.>")?,
        ),
        (
            "$JS.API.CONSUMER.CREATE.MESH_DECISION.peek.mesh.decision.coder".to_owned(),
            create("MESH_DECISION", "mesh.decision.coder")?,
        ),
        (
            "$JS.API.STREAM.MSG.GET.MESH_DELIVER".to_owned(),
            serde_json::to_vec(&serde_json::json!({"last_by_subj": "mesh.deliver.coder.planner"}))?,
        ),
        (
            "$JS.API.DIRECT.GET.MESH_DECISION.mesh.decision.coder".to_owned(),
            vec![],
        ),
        (
            // With a subjects filter: who exchanged how many messages.
            "$JS.API.STREAM.INFO.MESH_DELIVER".to_owned(),
            serde_json::to_vec(&serde_json::json!({"subjects_filter": "mesh.deliver.coder.>"}))?,
        ),
        (
            "$JS.API.DIRECT.GET.MESH_DELIVER".to_owned(),
            serde_json::to_vec(
                &serde_json::json!({"seq": 1, "next_by_subj": "mesh.deliver.coder.>"}),
            )?,
        ),
    ] {
        // A refused request is dropped by the server: no answer can come.
        refused(&mallory, &events, &subject, body).await?;
    }
    // Still there for the coder, unconsumed.
    assert_eq!(pending(&admin, "MESH_DELIVER", "agent-coder").await?, 1);
    let consumers: Vec<String> = admin
        .get_stream("MESH_DELIVER")
        .await?
        .consumer_names()
        .filter_map(|n| async { n.ok() })
        .collect()
        .await;
    assert!(!consumers.contains(&"peek".to_owned()), "{consumers:?}");
    Ok(())
}

#[tokio::test]
async fn no_agent_or_service_can_delete_purge_or_change_streams() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    deliver_as_worker(&mesh, "coder").await?;
    js_of(mesh.connect_as("mallory").await?.0)
        .publish("mesh.ingress.mallory.step", "{}".into())
        .await?
        .await?;

    let update = serde_json::to_vec(&serde_json::json!({
        "name": "MESH_INGRESS", "subjects": ["mesh.ingress.>"], "max_msgs": 1,
    }))?;
    for who in ["mallory", AUDIT_SINK, GPU_SCALER, POLICY_WORKER] {
        let (client, events) = mesh.connect_as(who).await?;
        for (subject, body) in [
            ("$JS.API.STREAM.DELETE.MESH_INGRESS", vec![]),
            ("$JS.API.STREAM.PURGE.MESH_DELIVER", vec![]),
            ("$JS.API.STREAM.UPDATE.MESH_INGRESS", update.clone()),
            ("$JS.API.STREAM.CREATE.EVIL", update.clone()),
            (
                "$JS.API.STREAM.MSG.DELETE.MESH_INGRESS",
                serde_json::to_vec(&serde_json::json!({"seq": 1}))?,
            ),
            ("$JS.API.CONSUMER.DELETE.MESH_DELIVER.agent-coder", vec![]),
            ("$JS.API.CONSUMER.DELETE.MESH_INGRESS.policy-worker", vec![]),
            ("$JS.API.STREAM.DELETE.KV_mesh-agents", vec![]),
        ] {
            refused(&client, &events, subject, body).await?;
        }
        // The client API says the same.
        let js = js_of(client);
        assert!(js.delete_stream("MESH_DELIVER").await.is_err(), "{who}");
    }

    assert_eq!(messages(&admin, "MESH_INGRESS").await?, 1);
    assert_eq!(messages(&admin, "MESH_DELIVER").await?, 1);
    assert_eq!(pending(&admin, "MESH_DELIVER", "agent-coder").await?, 1);
    let mut ingress = admin.get_stream("MESH_INGRESS").await?;
    assert_eq!(ingress.info().await?.config.max_messages, -1);
    assert!(admin.get_stream("EVIL").await.is_err());
    Ok(())
}

#[tokio::test]
async fn dropping_redacted_originals_lets_the_worker_erase_ingress_and_the_sink_follow_it()
-> anyhow::Result<()> {
    // `--redacted-original drop` (docs/guardrails.md, "Redaction"): the
    // worker erases an original from MESH_INGRESS; the sink reads the
    // worker's progress there and whether a message is still stored. Without
    // it the worker may delete nothing (`no_agent_or_service_can_delete_…`).
    let mesh = SecureNats::start_with(&["coder"], broker_config::RedactedOriginal::Drop).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let coder = js_of(mesh.connect_as("coder").await?.0);
    let seq = coder
        .publish("mesh.ingress.coder.step", "{}".into())
        .await?
        .await?
        .sequence;
    let worker = mesh.jetstream(POLICY_WORKER).await?;
    let ingress = worker.get_stream_no_info("MESH_INGRESS").await?;
    assert!(ingress.delete_message(seq).await?);
    assert_eq!(messages(&admin, "MESH_INGRESS").await?, 0);
    let sink = mesh.jetstream(AUDIT_SINK).await?;
    let ingress = sink.get_stream_no_info("MESH_INGRESS").await?;
    let info = ingress.consumer_info("policy-worker").await?;
    assert_eq!(info.name, "policy-worker");
    // The broker answers (a refused request would get no answer at all).
    let gone = ingress.get_raw_message(seq).await.err().map(|e| e.kind());
    assert_eq!(
        gone,
        Some(jetstream::stream::RawMessageErrorKind::NoMessageFound)
    );
    // Still nothing more: the worker cannot purge or delete the stream.
    let (client, events) = mesh.connect_as(POLICY_WORKER).await?;
    for subject in [
        "$JS.API.STREAM.PURGE.MESH_INGRESS",
        "$JS.API.STREAM.DELETE.MESH_INGRESS",
        "$JS.API.STREAM.MSG.DELETE.MESH_DELIVER",
    ] {
        refused(&client, &events, subject, vec![]).await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_overwrite_another_agents_card() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let coder = mesh.jetstream("coder").await?;
    coder
        .get_key_value("mesh-agents")
        .await?
        .put("coder", "{\"id\":\"coder\"}".into())
        .await?;
    let (mallory, events) = mesh.connect_as("mallory").await?;
    let subject = "$KV.mesh-agents.coder";
    mallory
        .publish(subject, "{\"id\":\"coder\",\"tools\":[\"evil\"]}".into())
        .await?;
    mallory.flush().await?;
    violation(&events, subject).await?;
    let kv = js_of(mallory).get_key_value("mesh-agents").await?;
    assert!(kv.put("coder", "overwritten".into()).await.is_err());
    assert!(kv.delete("coder").await.is_err());
    assert!(kv.purge("coder").await.is_err());
    // Reading is allowed (the directory is public), and shows the original.
    assert_eq!(
        kv.get("coder").await?.as_deref(),
        Some(&b"{\"id\":\"coder\"}"[..])
    );
    // Her own card is hers to write.
    kv.put("mallory", "{\"id\":\"mallory\"}".into()).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let history = admin.get_key_value("mesh-agents").await?;
    assert_eq!(
        history.get("coder").await?.as_deref(),
        Some(&b"{\"id\":\"coder\"}"[..])
    );
    assert_eq!(
        history.entry("coder").await?.map(|e| e.revision),
        Some(1),
        "one write to the coder's card"
    );
    Ok(())
}

#[tokio::test]
async fn a_removed_agents_key_no_longer_connects() -> anyhow::Result<()> {
    let mut mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (mallory, _) = mesh.connect_as("mallory").await?;
    js_of(mallory.clone())
        .publish("mesh.ingress.mallory.step", "{}".into())
        .await?
        .await?;

    let seed = mesh.remove_agent("mallory").await?;
    // A new connection with the old key is refused...
    let refused = mesh.connect_with_seed(&seed).await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.to_lowercase().contains("authorization"), "{err}");
    // ...and the open one was cut: nothing more of hers is stored.
    eventually(WAIT, "the open connection to be closed", || async {
        (mallory.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await?;
    let late = js_of(mallory)
        .publish("mesh.ingress.mallory.late", "{}".into())
        .await;
    if let Ok(ack) = late {
        assert!(
            tokio::time::timeout(Duration::from_secs(2), ack)
                .await
                .map(|r| r.is_err())
                .unwrap_or(true)
        );
    }
    assert_eq!(messages(&admin, "MESH_INGRESS").await?, 1);
    // The others are unaffected.
    js_of(mesh.connect_as("coder").await?.0)
        .publish("mesh.ingress.coder.step", "{}".into())
        .await?
        .await?;
    // Adding an agent later works without a restart.
    mesh.add_agent("reviewer").await?;
    js_of(mesh.connect_as("reviewer").await?.0)
        .publish("mesh.ingress.reviewer.step", "{}".into())
        .await?
        .await?;
    assert_eq!(messages(&admin, "MESH_INGRESS").await?, 3);
    Ok(())
}

#[tokio::test]
async fn an_agents_durable_cannot_be_turned_into_a_push_consumer() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder", "mallory"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (mallory, _) = mesh.connect_as("mallory").await?;
    let subject = "$JS.API.CONSUMER.CREATE.MESH_DELIVER.agent-mallory.mesh.deliver.mallory.>";
    for extra in [
        serde_json::json!({"deliver_subject": "mesh.deliver.coder.mallory"}),
        serde_json::json!({"deliver_subject": "mesh.deliver.coder.mallory", "max_waiting": 512}),
        serde_json::json!({"deliver_subject": "mesh.ingress.coder.x", "max_waiting": 0}),
    ] {
        let mut config = serde_json::to_value(broker_config::agent_consumer_config("mallory"))?;
        for (k, v) in extra.as_object().into_iter().flatten() {
            config[k] = v.clone();
        }
        let body = serde_json::to_vec(&serde_json::json!({
            "stream_name": "MESH_DELIVER", "config": config,
        }))?;
        let answer = mallory.request(subject, body.into()).await?;
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
        assert!(answer["error"].is_object(), "{answer}");
    }
    let info = admin
        .get_stream("MESH_DELIVER")
        .await?
        .consumer_info("agent-mallory")
        .await?;
    assert!(info.config.deliver_subject.is_none());
    // The SDK's own create request for its durable is accepted (an update).
    let ok = js_of(mallory)
        .create_consumer_on_stream(
            broker_config::agent_consumer_config("mallory"),
            "MESH_DELIVER",
        )
        .await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    Ok(())
}

#[tokio::test]
async fn services_hold_only_their_own_rights() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder"]).await?;
    let admin = mesh.jetstream(ADMIN).await?;
    let (headers, payload) = forged_event();
    for (who, subject) in [
        (AUDIT_SINK, "mesh.deliver.coder.planner"),
        (AUDIT_SINK, "mesh.ingress.coder.step"),
        (AUDIT_SINK, "mesh.decision.coder"),
        (GPU_SCALER, "mesh.deliver.coder.planner"),
        (GPU_SCALER, "$KV.mesh-agents.coder"),
        (POLICY_WORKER, "mesh.ingress.coder.step"),
        (POLICY_WORKER, "$KV.mesh-agents.coder"),
        (POLICY_WORKER, "$KV.mesh-gpu-leases.gpu-0"),
        (POLICY_WORKER, "mesh.gpu.lease.coder"),
        ("coder", "$KV.mesh-gpu-leases.gpu-0"),
        ("coder", "mesh.gpu.lease.coder"),
        ("coder", "mesh.dead.coder"),
    ] {
        let (client, events) = mesh.connect_as(who).await?;
        client
            .publish_with_headers(subject, headers.clone(), payload.clone())
            .await?;
        client.flush().await?;
        violation(&events, subject).await?;
    }
    for stream in [
        "MESH_INGRESS",
        "MESH_DELIVER",
        "MESH_DECISION",
        "MESH_DEAD",
        "MESH_GPU",
    ] {
        assert_eq!(messages(&admin, stream).await?, 0, "{stream}");
    }
    assert_eq!(messages(&admin, "KV_mesh-agents").await?, 0);
    assert_eq!(messages(&admin, "KV_mesh-gpu-leases").await?, 0);

    // What each may do, it can.
    let scaler = mesh.jetstream(GPU_SCALER).await?;
    scaler
        .get_key_value("mesh-gpu-leases")
        .await?
        .put("gpu-0", "{\"pool\":\"coder\"}".into())
        .await?;
    scaler
        .publish("mesh.gpu.lease.coder", "{}".into())
        .await?
        .await?;
    let worker = mesh.jetstream(POLICY_WORKER).await?;
    for subject in ["mesh.decision.coder", "mesh.dead.coder"] {
        worker.publish(subject, "{}".into()).await?.await?;
    }
    let sink = mesh.jetstream(AUDIT_SINK).await?;
    let events = sink.get_stream("MESH_INGRESS").await?;
    let durable = events
        .get_consumer::<consumer::pull::Config>("audit-sink-events")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(
        durable.cached_info().config.ack_policy,
        consumer::AckPolicy::Explicit
    );
    let mut batch = sink
        .get_stream("MESH_DECISION")
        .await?
        .get_consumer::<consumer::pull::Config>("audit-sink-decisions")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .fetch()
        .max_messages(10)
        .messages()
        .await?;
    let first = tokio::time::timeout(WAIT, batch.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the sink read nothing"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(first.subject.as_str(), "mesh.decision.coder");
    first.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    for stream in ["MESH_GPU", "MESH_DECISION", "MESH_DEAD"] {
        assert_eq!(messages(&admin, stream).await?, 1, "{stream}");
    }
    Ok(())
}

#[tokio::test]
async fn an_agent_has_what_the_sdk_needs() -> anyhow::Result<()> {
    let mesh = SecureNats::start(&["coder", "planner"]).await?;
    let js = mesh.jetstream("coder").await?;
    // Start-up checks: which stream holds its subjects (names only).
    for (subject, stream) in [
        ("mesh.ingress.coder.step", "MESH_INGRESS"),
        ("mesh.deliver.coder.any", "MESH_DELIVER"),
        ("mesh.decision.coder", "MESH_DECISION"),
    ] {
        assert_eq!(js.stream_by_subject(subject).await?, stream);
    }
    // Its durable, its deliveries, acks.
    let durable: consumer::PullConsumer = js
        .create_consumer_on_stream(
            broker_config::agent_consumer_config("coder"),
            "MESH_DELIVER",
        )
        .await?;
    let (client, events) = mesh.connect_as("coder").await?;
    let mut receipts = client.subscribe("mesh.decision.coder").await?;
    let mut live = client.subscribe("mesh.deliver.coder.>").await?;
    client.flush().await?;
    deliver_as_worker(&mesh, "coder").await?;
    let worker = mesh.jetstream(POLICY_WORKER).await?;
    worker
        .publish("mesh.decision.coder", "{}".into())
        .await?
        .await?;
    let mut batch = durable.fetch().max_messages(1).messages().await?;
    let delivered = tokio::time::timeout(WAIT, batch.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no delivery"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(delivered.subject.as_str(), "mesh.deliver.coder.planner");
    delivered
        .double_ack()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tokio::time::timeout(WAIT, receipts.next()).await?;
    tokio::time::timeout(WAIT, live.next()).await?;
    // Its card, and the others'.
    let kv = js.get_key_value("mesh-agents").await?;
    kv.put("coder", "{}".into()).await?;
    js_of(mesh.connect_as("planner").await?.0)
        .get_key_value("mesh-agents")
        .await?
        .put("planner", "{\"id\":\"planner\"}".into())
        .await?;
    assert!(kv.get("planner").await?.is_some());
    let mut keys: Vec<String> = Vec::new();
    let stream = js.get_stream("KV_mesh-agents").await?;
    let mut listing = stream.info_with_subjects("$KV.mesh-agents.>").await?;
    while let Some(entry) = listing.next().await {
        keys.push(entry?.0);
    }
    keys.sort();
    assert_eq!(keys, ["$KV.mesh-agents.coder", "$KV.mesh-agents.planner"]);
    assert!(events.all().is_empty(), "{:?}", events.all());
    Ok(())
}

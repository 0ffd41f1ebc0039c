//! What the SDK puts on the wire, read back from `MESH_INGRESS` of a real
//! nats-server (no policy worker needed): subjects, CloudEvent attributes,
//! trace and causation chains, data; and how connecting fails.

// Test helpers outside `#[test]` fns panic to fail the test, too.
#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::sdk_support as support;

use agents_sdk::{Agent, ConnectErrorKind, EventType, PublishErrorKind};
use async_nats::jetstream::message::StreamMessage;
use schemas::{Limits, MeshEvent, TraceParent};
use serde_json::{Value, json};
use support::*;

fn data(m: &StreamMessage) -> Value {
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test]
async fn each_step_type_lands_on_ingress_with_its_attributes() {
    let mesh = Mesh::start().await;
    let agent = mesh.agent(Agent::builder("planner")).await;
    let wf = agent.workflow();

    let steps = vec![
        (
            EventType::Prompt,
            "prompt",
            wf.prompt("Add a parser test").await.unwrap(),
        ),
        (
            EventType::Reasoning,
            "reasoning",
            wf.reasoning("The parser lacks an empty-input test")
                .with("tokens", 42)
                .await
                .unwrap(),
        ),
        (
            EventType::Action,
            "action",
            wf.action("write_test")
                .with("description", "one test")
                .await
                .unwrap(),
        ),
        (
            EventType::Observation,
            "observation",
            wf.observation("tests pass").await.unwrap(),
        ),
        (
            EventType::MemoryUpdate,
            "memory_update",
            wf.memory_update("last_task", json!({"parser": "tested"}))
                .await
                .unwrap(),
        ),
        (
            EventType::Output,
            "output",
            wf.output("done").await.unwrap(),
        ),
    ];

    let mut previous: Option<String> = None;
    let mut spans = std::collections::HashSet::new();
    for (ty, token, published) in &steps {
        let m = mesh.ingress(published.sequence).await;
        assert_eq!(m.subject.as_str(), format!("mesh.ingress.planner.{token}"));
        assert_eq!(published.subject, m.subject.as_str());

        // It is a valid mesh event for the subject it arrived on.
        let event =
            MeshEvent::from_message(&m.subject, Some(&m.headers), &m.payload, Limits::default())
                .unwrap_or_else(|e| panic!("{token}: {e}"));
        assert_eq!(event.event_type, *ty);
        assert_eq!(event.mode, schemas::ContentMode::Binary);
        assert_eq!(header(&m, "ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(header(&m, "ce-source").as_deref(), Some("/agents/planner"));
        assert_eq!(header(&m, "ce-type").as_deref(), Some(ty.as_str()));
        assert_eq!(
            header(&m, "ce-datacontenttype").as_deref(),
            Some("application/json")
        );
        assert!(header(&m, "ce-time").is_some(), "{token}: no time");
        assert_eq!(header(&m, "ce-target"), None);

        // id: a UUIDv7, also the JetStream de-duplication id.
        let id = header(&m, "ce-id").unwrap();
        assert_eq!(id, published.id);
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
        assert_eq!(header(&m, "Nats-Msg-Id"), Some(format!("planner/{id}")));

        // One trace, one new span per step.
        let tp: TraceParent = header(&m, "ce-traceparent").unwrap().parse().unwrap();
        assert_eq!(tp.trace_id_hex(), wf.trace_id());
        assert_eq!(tp, published.trace);
        assert!(spans.insert(tp.parent_id), "{token}: span reused");
        assert!(!event.trace_derived);

        // Each step follows the one before; the first is the root.
        assert_eq!(header(&m, "ce-causationid"), previous, "{token}");
        assert_eq!(
            header(&m, "ce-causationsource").as_deref(),
            previous.as_ref().map(|_| "/agents/planner"),
            "{token}"
        );
        previous = Some(id);
    }
    assert_eq!(wf.last_event_id(), previous);

    let m = |i: usize| steps[i].2.sequence;
    assert_eq!(
        data(&mesh.ingress(m(0)).await),
        json!({"text": "Add a parser test"})
    );
    assert_eq!(
        data(&mesh.ingress(m(1)).await),
        json!({"text": "The parser lacks an empty-input test", "tokens": 42})
    );
    assert_eq!(
        data(&mesh.ingress(m(2)).await),
        json!({"name": "write_test", "description": "one test"})
    );
    assert_eq!(
        data(&mesh.ingress(m(3)).await),
        json!({"text": "tests pass"})
    );
    assert_eq!(
        data(&mesh.ingress(m(4)).await),
        json!({"key": "last_task", "value": {"parser": "tested"}})
    );
    assert_eq!(data(&mesh.ingress(m(5)).await), json!({"text": "done"}));
}

#[tokio::test]
async fn handoffs_and_messages_name_their_target() {
    let mesh = Mesh::start().await;
    let agent = mesh.agent(Agent::builder("planner")).await;
    let wf = agent.workflow();

    let handoff = wf
        .handoff("coder", "write the parser test")
        .with("context", json!({"file": "src/parser.rs"}))
        .await
        .unwrap();
    let m = mesh.ingress(handoff.sequence).await;
    assert_eq!(m.subject.as_str(), "mesh.ingress.planner.task_handoff");
    assert_eq!(
        header(&m, "ce-type").as_deref(),
        Some("io.agentmesh.task.handoff")
    );
    assert_eq!(header(&m, "ce-target").as_deref(), Some("coder"));
    assert_eq!(
        header(&m, "ce-causationid"),
        None,
        "the first step is the root"
    );
    assert_eq!(
        data(&m),
        json!({"task": "write the parser test", "context": {"file": "src/parser.rs"}})
    );

    let message = wf
        .message("reviewer", json!({"note": "heads up"}))
        .await
        .unwrap();
    let m = mesh.ingress(message.sequence).await;
    assert_eq!(m.subject.as_str(), "mesh.ingress.planner.message");
    assert_eq!(header(&m, "ce-target").as_deref(), Some("reviewer"));
    assert_eq!(header(&m, "ce-causationid"), Some(handoff.id.clone()));
    assert_eq!(data(&m), json!({"body": {"note": "heads up"}}));

    // Explicit causation and root steps.
    let side = wf
        .observation("side note")
        .caused_by(&handoff.id)
        .await
        .unwrap();
    let side = mesh.ingress(side.sequence).await;
    assert_eq!(header(&side, "ce-causationid"), Some(handoff.id.clone()));
    // An id given by hand has no known source.
    assert_eq!(header(&side, "ce-causationsource"), None);
    let root = wf.prompt("new question").root().await.unwrap();
    assert_eq!(
        header(&mesh.ingress(root.sequence).await, "ce-causationid"),
        None
    );

    // A bad target never reaches the broker.
    let err = wf.handoff("Not An Agent", "x").await.unwrap_err();
    assert_eq!(
        err.kind(),
        PublishErrorKind::InvalidTarget("Not An Agent".into())
    );
    let err = wf
        .observation("x")
        .with("a", 1)
        .data("not an object")
        .with("b", 2)
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), PublishErrorKind::Data(_)), "{err}");
}

#[tokio::test]
async fn connecting_fails_with_a_kind_that_says_why() {
    let mesh = Mesh::start().await;
    let err = Agent::connect("Bad Id", mesh.url()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::InvalidAgentId("Bad Id".into())
    );

    // A server without the mesh's streams.
    let bare = testkit::NatsServer::start().await.unwrap();
    let err = Agent::connect("planner", bare.url()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::MissingStream("MESH_INGRESS".into())
    );
    assert!(err.to_string().contains("meshctl up"), "{err}");

    // Nothing listening.
    let port = testkit::free_port().unwrap();
    let err = Agent::connect("planner", format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ConnectErrorKind::Connect(_)), "{err}");
}

async fn apply_streams(client: async_nats::Client) {
    broker_config::apply(
        &async_nats::jetstream::new(client),
        &broker_config::Options::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn credentials_are_passed_to_nats() {
    init_tracing();
    let server = CustomServer::start(&["--user", "planner", "--pass", "s3cret"]).await;
    let admin =
        async_nats::ConnectOptions::with_user_and_password("planner".into(), "s3cret".into())
            .connect(server.url())
            .await
            .unwrap();
    apply_streams(admin).await;

    let err = Agent::connect("planner", server.url()).await.unwrap_err();
    assert!(
        matches!(err.kind(), ConnectErrorKind::Refused { .. }),
        "{err}"
    );
    let err = Agent::builder("planner")
        .user_and_password("planner", "wrong")
        .connect(server.url())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ConnectErrorKind::Refused { .. }),
        "{err}"
    );
    let agent = Agent::builder("planner")
        .user_and_password("planner", "s3cret")
        .connect(server.url())
        .await
        .unwrap();
    agent.workflow().prompt("authenticated").await.unwrap();

    let server = CustomServer::start(&["--auth", "t0ken"]).await;
    let admin = async_nats::ConnectOptions::with_token("t0ken".into())
        .connect(server.url())
        .await
        .unwrap();
    apply_streams(admin).await;
    let agent = Agent::builder("planner")
        .token("t0ken")
        .connect(server.url())
        .await
        .unwrap();
    agent.workflow().prompt("authenticated").await.unwrap();

    let err = Agent::builder("planner")
        .credentials_file("/nonexistent/planner.creds")
        .connect(server.url())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::Credentials("/nonexistent/planner.creds".into())
    );
}

#[tokio::test]
async fn nkey_authentication() {
    init_tracing();
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let server = CustomServer::start(&["-c", config.to_str().unwrap()]).await;
    let seed = user.seed().unwrap();
    let admin = async_nats::ConnectOptions::with_nkey(seed.clone())
        .connect(server.url())
        .await
        .unwrap();
    apply_streams(admin).await;

    // Refused: the message names the key to pass and how to get one.
    let err = Agent::connect("planner", server.url()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::Refused {
            agent: "planner".into(),
            url: server.url(),
            key: None
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("refused agent `planner` without a key file (authorization violation)")
            && message.contains("AGENTMESH_NKEY_FILE=.agentmesh/auth/agents/planner.nk")
            && message.contains("`meshctl agents add planner`"),
        "{message}"
    );
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(
        &stranger,
        format!("{}\n", nkeys::KeyPair::new_user().seed().unwrap()),
    )
    .unwrap();
    let err = Agent::builder("planner")
        .nkey_file(&stranger)
        .connect(server.url())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("with the key in `{}`", stranger.display())),
        "{err}"
    );

    let agent = Agent::builder("planner")
        .nkey(seed.clone())
        .connect(server.url())
        .await
        .unwrap();
    agent
        .workflow()
        .prompt("signed in with an nkey")
        .await
        .unwrap();

    // A seed file as `meshctl agents add` writes it.
    let seed_file = dir.path().join("planner.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let agent = Agent::builder("planner")
        .nkey_file(&seed_file)
        .connect(server.url())
        .await
        .unwrap();
    agent
        .workflow()
        .prompt("signed in with a seed file")
        .await
        .unwrap();
    let not_a_key = dir.path().join("nats.conf");
    let err = Agent::builder("planner")
        .nkey_file(&not_a_key)
        .connect(server.url())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::Credentials(not_a_key.display().to_string())
    );
}

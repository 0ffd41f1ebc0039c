//! `apply` against a real nats-server: creates, is idempotent, updates in
//! place without losing data.

use std::time::Duration;

use async_nats::jetstream;
use broker_config::{Change, Options, apply};

#[tokio::test]
async fn apply_is_idempotent_and_keeps_data() {
    let nats = testkit::NatsServer::start().await.unwrap();
    let js = jetstream::new(nats.connect().await.unwrap());

    let first = apply(&js, &Options::default()).await.unwrap();
    assert_eq!(first.len(), 15);
    assert!(
        first.iter().all(|(_, c)| *c == Change::Created),
        "{first:?}"
    );

    js.publish("mesh.ingress.planner.x", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let kv = js.get_key_value("mesh-agents").await.unwrap();
    kv.put("planner", "card".into()).await.unwrap();

    let second = apply(&js, &Options::default()).await.unwrap();
    assert!(
        second.iter().all(|(_, c)| *c == Change::Unchanged),
        "{second:?}"
    );

    let longer = Options {
        max_age: Duration::from_secs(30 * 24 * 3600),
        ..Options::default()
    };
    let third = apply(&js, &longer).await.unwrap();
    assert_eq!(
        third.iter().filter(|(_, c)| *c == Change::Updated).count(),
        7,
        "{third:?}"
    );

    let mut ingress = js.get_stream("MESH_INGRESS").await.unwrap();
    let info = ingress.info().await.unwrap();
    assert_eq!(info.state.messages, 1, "update must not lose data");
    assert_eq!(info.config.max_age, longer.max_age);
    assert_eq!(kv.get("planner").await.unwrap().unwrap(), "card");

    // A service started without `--stream-max-age-days` keeps what the
    // operator set: neither back to 7 days nor anything else.
    let unset = Options {
        keep_existing_max_age: true,
        ..Options::default()
    };
    let fourth = apply(&js, &unset).await.unwrap();
    assert!(
        fourth.iter().all(|(_, c)| *c == Change::Unchanged),
        "{fourth:?}"
    );
    let info = ingress.info().await.unwrap();
    assert_eq!(info.config.max_age, longer.max_age);
    // MESH_AUDIT stays kept for good whatever the setting.
    let mut audit = js.get_stream("MESH_AUDIT").await.unwrap();
    assert_eq!(audit.info().await.unwrap().config.max_age, Duration::ZERO);
}

/// A stream created by a service without the setting gets the default
/// (7 days); with it, the setting.
#[tokio::test]
async fn a_new_stream_gets_the_configured_max_age() {
    let nats = testkit::NatsServer::start().await.unwrap();
    let js = jetstream::new(nats.connect().await.unwrap());
    let half_year = Duration::from_secs(183 * 24 * 3600);
    apply(
        &js,
        &Options {
            max_age: half_year,
            keep_existing_max_age: false,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ingress = js.get_stream("MESH_INGRESS").await.unwrap();
    assert_eq!(ingress.info().await.unwrap().config.max_age, half_year);

    let other = testkit::NatsServer::start().await.unwrap();
    let js = jetstream::new(other.connect().await.unwrap());
    let unset = Options {
        keep_existing_max_age: true,
        ..Options::default()
    };
    apply(&js, &unset).await.unwrap();
    let mut ingress = js.get_stream("MESH_INGRESS").await.unwrap();
    assert_eq!(
        ingress.info().await.unwrap().config.max_age,
        Options::default().max_age
    );
}

/// Services start together and apply at the same moment; none may fail
/// because another created a stream or bucket between its lookup and its
/// create.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_applies_all_succeed() {
    for round in 0..5 {
        let nats = testkit::NatsServer::start().await.unwrap();
        let mut contexts = Vec::new();
        for _ in 0..6 {
            contexts.push(jetstream::new(nats.connect().await.unwrap()));
        }
        let applies = contexts
            .iter()
            .map(|js| async move { apply(js, &Options::default()).await });
        let results = futures::future::join_all(applies).await;
        for result in results {
            let changes = result.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(changes.len(), 15, "{changes:?}");
        }
        // A later apply finds everything in place.
        let again = apply(&contexts[0], &Options::default()).await.unwrap();
        assert!(
            again.iter().all(|(_, c)| *c == Change::Unchanged),
            "{again:?}"
        );
    }
}

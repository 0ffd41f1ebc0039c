//! `apply` against a real nats-server: creates, is idempotent, updates in
//! place without losing data.
#![expect(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::time::Duration;

use async_nats::jetstream;
use broker_config::{Change, DEFAULT_MAX_CONSUMERS, Options, apply};

/// One more consumer than nats-server 2.15 allows a stream by default.
const PAST_THE_DEFAULT_LIMIT: usize = 1_001;

/// A fresh nats-server with the mesh's streams and buckets applied.
async fn applied() -> (testkit::NatsServer, jetstream::Context) {
    let nats = testkit::NatsServer::start().await.unwrap();
    let js = jetstream::new(nats.connect().await.unwrap());
    apply(&js, &Options::default()).await.unwrap();
    (nats, js)
}

/// The consumers `stream` has.
async fn consumer_count(js: &jetstream::Context, stream: &str) -> usize {
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.consumer_count
}

/// Whether nats-server `version` refuses to change an existing stream's
/// consumer limit (2.9 and older).
fn refuses_limit_change(version: &str) -> bool {
    version.starts_with("2.9.") || version.starts_with("2.8.")
}

/// What `apply` reports for a stream or bucket whose consumer limit it
/// moves: unchanged where the server refuses.
fn moved(refuses: bool) -> Change {
    if refuses {
        Change::Unchanged
    } else {
        Change::Updated
    }
}

/// Checks the consumer limit of each of `streams` after `apply` on an
/// older layout: `kept` keeps the operator's 5,000, the rest have the
/// mesh's limit, or none where the server refuses to change it.
async fn assert_consumer_limits<'a>(
    js: &jetstream::Context,
    streams: impl IntoIterator<Item = &'a str>,
    kept: &str,
    refuses: bool,
    version: &str,
) {
    for name in streams {
        let mut now = js.get_stream(name).await.unwrap();
        let limit = if name == kept {
            5_000
        } else if refuses {
            -1
        } else {
            DEFAULT_MAX_CONSUMERS
        };
        let config = &now.info().await.unwrap().config;
        assert_eq!(config.max_consumers, limit, "{version}: {name}");
    }
}

/// A second `apply` changes nothing.
async fn assert_applied_again_unchanged(js: &jetstream::Context) {
    let again = apply(js, &Options::default()).await.unwrap();
    assert!(
        again.iter().all(|(_, c)| *c == Change::Unchanged),
        "{again:?}"
    );
}

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
        assert_applied_again_unchanged(&contexts[0]).await;
    }
}

/// Every `MESH_*` stream gets an explicit consumer limit: one left to the
/// server takes its default, 1,000 on nats-server 2.15, which is 1,000
/// agents.
#[tokio::test]
async fn every_mesh_stream_gets_an_explicit_consumer_limit() {
    let (_nats, js) = applied().await;
    let streams = broker_config::streams(&Options::default());
    assert!(streams.iter().any(|s| s.name == "MESH_DELIVER"));
    for wanted in streams {
        let mut stream = js.get_stream(&wanted.name).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().config.max_consumers,
            DEFAULT_MAX_CONSUMERS,
            "{}",
            wanted.name
        );
    }
    let smaller = Options {
        max_consumers: 2_000,
        ..Options::default()
    };
    let other = testkit::NatsServer::start().await.unwrap();
    let js = jetstream::new(other.connect().await.unwrap());
    apply(&js, &smaller).await.unwrap();
    let mut call = js.get_stream("MESH_CALL").await.unwrap();
    assert_eq!(call.info().await.unwrap().config.max_consumers, 2_000);
}

/// A stream an older agentmesh made has no limit of its own (the server
/// reports -1: its default); the next start moves it to ours, keeping its
/// messages. A positive limit an operator set is kept. nats-server 2.9
/// refuses to change the limit of an existing stream: there the start goes
/// on (with a warning) and still moves the other settings.
#[tokio::test]
async fn a_stream_without_a_consumer_limit_is_moved_and_an_operators_is_kept() {
    let nats = testkit::NatsServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let version = client.server_info().version;
    let refuses = refuses_limit_change(&version);
    let js = jetstream::new(client);
    let day = Duration::from_secs(24 * 3600);
    let wanted = broker_config::streams(&Options::default());
    let mut old = wanted.clone();
    for stream in &mut old {
        stream.max_consumers = if stream.name == "MESH_CALL" { 5_000 } else { 0 };
        if stream.name == "MESH_DELIVER" || stream.name == "MESH_CALL" {
            stream.max_age = day;
        }
        js.create_stream(stream.clone()).await.unwrap();
    }
    let mut deliver = js.get_stream("MESH_DELIVER").await.unwrap();
    assert_eq!(deliver.info().await.unwrap().config.max_consumers, -1);
    js.publish("mesh.deliver.coder.planner", "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let changes = apply(&js, &Options::default()).await.unwrap();
    let change = |name: &str| changes.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(change("MESH_DELIVER"), Change::Updated, "{changes:?}");
    assert_eq!(change("MESH_CALL"), Change::Updated, "{changes:?}");
    assert_eq!(
        change("MESH_INGRESS"),
        moved(refuses),
        "{version}: {changes:?}"
    );
    let info = deliver.info().await.unwrap();
    assert_eq!(info.state.messages, 1, "update must not lose data");
    assert_eq!(info.config.max_age, Options::default().max_age);
    let names = wanted.iter().map(|stream| stream.name.as_str());
    assert_consumer_limits(&js, names, "MESH_CALL", refuses, &version).await;
    for stream in &wanted {
        let mut now = js.get_stream(&stream.name).await.unwrap();
        let config = &now.info().await.unwrap().config;
        assert_eq!(config.max_age, stream.max_age, "{}", stream.name);
    }
    assert_applied_again_unchanged(&js).await;
}

/// More agents than the server's default consumer limit (1,000 on
/// nats-server 2.15) register: each has its own durable on MESH_DELIVER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_agents_register() {
    use futures::StreamExt;
    let (_nats, js) = applied().await;
    const AGENTS: usize = PAST_THE_DEFAULT_LIMIT;
    let started = std::time::Instant::now();
    let results: Vec<_> = futures::stream::iter(0..AGENTS)
        .map(|i| {
            let js = js.clone();
            async move {
                let id = format!("agent-{i}");
                broker_config::ensure_consumer(
                    &js,
                    "MESH_DELIVER",
                    broker_config::agent_consumer_config(&id),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for result in results {
        assert_eq!(result.unwrap(), Change::Created);
    }
    eprintln!("{AGENTS} consumers in {:?}", started.elapsed());
    assert_eq!(consumer_count(&js, "MESH_DELIVER").await, AGENTS);
}

/// Every KV bucket's stream (`KV_<bucket>`) gets the consumer limit of
/// the `MESH_*` streams: each watcher of a bucket is an ordered consumer
/// on it, and one left to the server takes its default (1,000 on
/// nats-server 2.15). A bucket an older agentmesh made (no limit) is moved
/// to it, keeping its keys and every other setting; a positive limit an
/// operator set is kept. nats-server 2.9 refuses to change the limit of an
/// existing stream: there the start goes on and the bucket stays as it is.
#[tokio::test]
async fn every_bucket_gets_the_consumer_limit_and_an_older_one_is_moved() {
    let (_nats, js) = applied().await;
    let buckets = broker_config::buckets(&Options::default());
    assert!(buckets.iter().any(|b| b.name == "KV_mesh-agents"));
    for wanted in &buckets {
        let mut stream = js.get_stream(&wanted.name).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().config.max_consumers,
            DEFAULT_MAX_CONSUMERS,
            "{}",
            wanted.name
        );
    }

    let older = testkit::NatsServer::start().await.unwrap();
    let client = older.connect().await.unwrap();
    let version = client.server_info().version;
    let refuses = refuses_limit_change(&version);
    let js = jetstream::new(client);
    for bucket in &buckets {
        let mut old = bucket.clone();
        old.max_consumers = if bucket.name == "KV_mesh-flows" {
            5_000
        } else {
            0
        };
        js.create_stream(old).await.unwrap();
    }
    let mut agents = js.get_stream("KV_mesh-agents").await.unwrap();
    let before = agents.info().await.unwrap().config.clone();
    assert_eq!(before.max_consumers, -1);
    let kv = js.get_key_value("mesh-agents").await.unwrap();
    kv.put("planner", "card".into()).await.unwrap();

    let changes = apply(&js, &Options::default()).await.unwrap();
    let change = |name: &str| changes.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(
        change("mesh-agents"),
        moved(refuses),
        "{version}: {changes:?}"
    );
    assert_eq!(change("mesh-flows"), Change::Unchanged, "{changes:?}");
    let names = buckets.iter().map(|bucket| bucket.name.as_str());
    assert_consumer_limits(&js, names, "KV_mesh-flows", refuses, &version).await;
    // Only the limit changes.
    let after = agents.info().await.unwrap().config.clone();
    assert_eq!(
        jetstream::stream::Config {
            max_consumers: before.max_consumers,
            ..after
        },
        before,
        "{version}"
    );
    assert_eq!(kv.get("planner").await.unwrap().unwrap(), "card");
    assert_applied_again_unchanged(&js).await;
}

/// More watchers of `mesh-agents` than the server's default consumer limit
/// (1,000 on nats-server 2.15) all start: each is an ordered consumer on
/// the bucket's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_watchers_follow_a_bucket() {
    use futures::StreamExt;
    let (_nats, js) = applied().await;
    let kv = js.get_key_value("mesh-agents").await.unwrap();
    const WATCHERS: usize = PAST_THE_DEFAULT_LIMIT;
    let started = std::time::Instant::now();
    let watchers: Vec<_> = futures::stream::iter(0..WATCHERS)
        .map(|_| kv.watch_all())
        .buffer_unordered(16)
        .collect()
        .await;
    let mut watches = Vec::new();
    for (i, watcher) in watchers.into_iter().enumerate() {
        watches.push(watcher.unwrap_or_else(|e| panic!("watcher {i}: {e}")));
    }
    eprintln!("{WATCHERS} watchers in {:?}", started.elapsed());
    assert_eq!(consumer_count(&js, "KV_mesh-agents").await, WATCHERS);
    kv.put("planner", "card".into()).await.unwrap();
    let last = watches.last_mut().unwrap();
    let entry = tokio::time::timeout(testkit::WAIT, last.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entry.key, "planner");
}

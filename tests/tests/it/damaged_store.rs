//! A cluster node that comes back with a damaged store: on a 3-node NATS
//! cluster with every stream at 3 replicas, the node leading
//! `MESH_DELIVER` is killed, the second half of the stream's message block
//! in its store is cut off, and it starts again. JetStream acknowledged
//! each message once a majority stored it, so the other nodes still hold
//! them all; the test checks that the stream serves every acknowledged
//! message afterwards, also once the damaged node leads it again, and
//! prints what the nodes logged.

#![expect(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::collections::BTreeSet;

use async_nats::jetstream::{self, message::PublishMessage};
use e2e::WAIT;
use schemas::subjects;
use testkit::{NatsCluster, Store, eventually};

/// Messages stored before the damage.
const N: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_with_a_truncated_block_leaves_every_acknowledged_message_in_the_stream() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores = dirs
        .iter()
        .map(|d| Store {
            dir: Some(d.path().join("store")),
            sync_interval: None,
        })
        .collect();
    let mut cluster = NatsCluster::start_with(stores).await.unwrap();
    let client = cluster.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let options = broker_config::Options {
        replicas: 3,
        ..Default::default()
    };
    broker_config::apply(&js, &options).await.unwrap();
    for i in 0..N {
        js.send_publish(
            subjects::deliver("coder", "planner"),
            PublishMessage::build()
                .payload(format!("delivery {i}").into())
                .message_id(format!("planner/e-{i}")),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let damaged = cluster
        .wait_for_leader(&client, subjects::STREAM_DELIVER, WAIT)
        .await
        .unwrap();
    cluster.kill(damaged);
    let blocks =
        testkit::stream_blocks(&cluster.store_dir(damaged), subjects::STREAM_DELIVER).unwrap();
    let (block, size) = blocks
        .iter()
        .map(|b| (b, std::fs::metadata(b).unwrap().len()))
        .rfind(|(_, size)| *size > 0)
        .unwrap_or_else(|| panic!("no message block with data: {blocks:?}"));
    let file = std::fs::OpenOptions::new().write(true).open(block).unwrap();
    file.set_len(size / 2).unwrap();
    drop(file);
    cluster.restart(damaged).await.unwrap();
    let log = std::fs::read_to_string(cluster.log_path(damaged)).unwrap();
    let restart = &log[log.rfind("Starting nats-server").unwrap()..];
    let said: Vec<&str> = restart
        .lines()
        .filter(|l| l.contains("MESH_DELIVER") || l.contains("[WRN]") || l.contains("[ERR]"))
        .collect();
    println!(
        "node {} (led MESH_DELIVER) back with {} of its {size} bytes: {said:#?}",
        cluster.name(damaged),
        size / 2
    );

    // Every acknowledged message is in the stream, led by another node.
    assert_all_there(&cluster, &js, "after the restart").await;
    // And once the damaged node leads the stream again (it has caught up
    // from the others, or it would not be elected).
    let name = cluster.name(damaged).to_owned();
    eventually(
        WAIT,
        "the damaged node to lead MESH_DELIVER again",
        || async {
            if NatsCluster::stream_leader(&client, subjects::STREAM_DELIVER)
                .await
                .as_deref()
                == Some(name.as_str())
            {
                return Some(());
            }
            let request = serde_json::json!({"placement": {"preferred": name}});
            let _ = client
                .request(
                    format!(
                        "$JS.API.STREAM.LEADER.STEPDOWN.{}",
                        subjects::STREAM_DELIVER
                    ),
                    serde_json::to_vec(&request).unwrap().into(),
                )
                .await;
            None
        },
    )
    .await
    .unwrap();
    assert_all_there(&cluster, &js, "with the damaged node leading").await;
}

/// The stream holds the `N` messages, each once.
async fn assert_all_there(cluster: &NatsCluster, js: &jetstream::Context, when: &str) {
    let client = cluster.connect().await.unwrap();
    cluster
        .wait_for_leader(&client, subjects::STREAM_DELIVER, WAIT)
        .await
        .unwrap();
    let messages = eventually(
        WAIT,
        "MESH_DELIVER to answer with every message",
        || async {
            let messages = testkit::stream_messages(js, subjects::STREAM_DELIVER)
                .await
                .ok()?;
            (messages.len() as u64 >= N).then_some(messages)
        },
    )
    .await;
    let messages = match messages {
        Ok(m) => m,
        Err(e) => {
            let state = js
                .get_stream(subjects::STREAM_DELIVER)
                .await
                .unwrap()
                .get_info()
                .await
                .map(|i| i.state);
            panic!("{when}: {e}; the stream's state: {state:?}");
        }
    };
    let ids: BTreeSet<String> = messages
        .iter()
        .filter_map(|m| m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()))
        .collect();
    let want: BTreeSet<String> = (0..N).map(|i| format!("planner/e-{i}")).collect();
    assert_eq!(
        messages.len() as u64,
        N,
        "{when}: {} messages",
        messages.len()
    );
    assert_eq!(ids, want, "{when}");
    println!("{when}: MESH_DELIVER serves all {N} acknowledged messages");
}

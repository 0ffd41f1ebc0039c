//! Operating the GPU scaler, against a real nats-server and the real
//! binary: `/readyz`, lease metrics on `/metrics`, and `gpu.scaling` spans
//! with one event per lease decision exported over OTLP.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use crate::common;

use std::net::SocketAddr;
use std::process::Command;

use telemetry::testing::{OtlpReceiver, http_get};
use testkit::{Service, WAIT, eventually, free_port, sample_value};

/// The value of one sample on `/metrics`, 0 when absent.
async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    sample_value(&body, sample)
}

#[tokio::test]
async fn leases_are_counted_and_each_scaling_round_is_a_span() {
    let mesh = common::mesh().await.unwrap();
    let receiver = OtlpReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pools.toml");
    std::fs::write(
        &config,
        r#"
poll_interval = "100ms"
lease_ttl = "15s"
inventory = "declared"

[[gpu]]
uuid = "GPU-00000000-0000-4000-8000-000000000000"
name = "declared-0"
memory_total_mib = 81920

[[gpu]]
uuid = "GPU-00000000-0000-4000-8000-000000000001"
name = "declared-1"
memory_total_mib = 81920

[pools.coder]
subjects = ["mesh.deliver.coder.>"]
target_backlog_per_gpu = 10
max_gpus = 2
cooldown = "100ms"
"#,
    )
    .unwrap();
    let consumer = common::work_consumer(&mesh.js, "coder").await.unwrap();
    let port = free_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut scaler = Service::spawn(
        Command::new(env!("CARGO_BIN_EXE_gpu-scaler"))
            .args(["--nats-url", &mesh.nats.url()])
            .arg("--config")
            .arg(&config)
            .args(["--instance", "ops-test"])
            .args(["--http-port", &port.to_string(), "--http-host", "127.0.0.1"])
            .args(["--otlp-endpoint", &receiver.endpoint()])
            .args(["--otlp-metrics-interval-ms", "200"])
            .env("RUST_LOG", "warn"),
    )
    .unwrap();
    let body = scaler
        .wait_until(WAIT, "the scaler's /readyz to answer 200", || async {
            match http_get(addr, "/readyz").await {
                Ok((200, body)) => Some(body),
                _ => None,
            }
        })
        .await
        .unwrap();
    assert_eq!(body, "rounds: ok\nnats: ok\n");

    common::publish_work(&mesh.js, "coder", 25).await.unwrap();
    eventually(WAIT, "two GPUs leased to `coder` on /metrics", || async {
        (metric(addr, "agentmesh_gpu_leases{pool=\"coder\"}").await == 2.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        metric(
            addr,
            "agentmesh_gpu_scaling_decisions_total{action=\"granted\",pool=\"coder\"}"
        )
        .await,
        2.0
    );
    assert!(metric(addr, "agentmesh_gpu_scaling_rounds_total").await >= 2.0);

    // The rounds that granted them are spans with one event per lease.
    let grants = eventually(WAIT, "gpu.scaling spans with both grants", || async {
        let grants: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.name == "gpu.scaling" && s.service == "gpu-scaler")
            .flat_map(|s| s.events)
            .filter(|(name, attrs)| {
                name == "gpu.lease"
                    && attrs.get("pool").map(String::as_str) == Some("coder")
                    && attrs.get("action").map(String::as_str) == Some("granted")
            })
            .collect();
        (grants.len() == 2).then_some(grants)
    })
    .await
    .unwrap();
    let gpus: std::collections::BTreeSet<_> =
        grants.iter().map(|(_, a)| a["gpu"].clone()).collect();
    assert_eq!(gpus.len(), 2, "{grants:?}");

    // Backlog drained: the leases go back.
    common::drain(&consumer).await.unwrap();
    eventually(WAIT, "the leases released on /metrics", || async {
        (metric(addr, "agentmesh_gpu_leases{pool=\"coder\"}").await == 0.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        metric(
            addr,
            "agentmesh_gpu_scaling_decisions_total{action=\"released\",pool=\"coder\"}"
        )
        .await,
        2.0
    );
}

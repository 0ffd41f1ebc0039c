//! The container healthcheck binary against a real health server.

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use std::process::Command;

use telemetry::{Ops, OpsConfig};

fn healthcheck(port: u16, path: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agentmesh-healthcheck"))
        .arg(path)
        .env("AGENTMESH_HTTP_PORT", port.to_string())
        .output()
        .unwrap()
}

#[tokio::test]
async fn exits_zero_only_on_200() {
    let config = OpsConfig {
        http_port: Some(0),
        http_host: "127.0.0.1".parse().unwrap(),
        ..OpsConfig::default()
    };
    let ops = Ops::start("test", &config).await.unwrap();
    let port = ops.local_addr().unwrap().port();

    let run = |path: &'static str| tokio::task::spawn_blocking(move || healthcheck(port, path));
    assert!(run("/healthz").await.unwrap().status.success());
    let not_ready = run("/readyz").await.unwrap();
    assert!(!not_ready.status.success());
    assert!(
        String::from_utf8_lossy(&not_ready.stderr).contains("503"),
        "{not_ready:?}"
    );
    ops.health().flag("nats", true);
    assert!(run("/readyz").await.unwrap().status.success());

    ops.shutdown().await;
    let down = run("/healthz").await.unwrap();
    assert!(!down.status.success());
}

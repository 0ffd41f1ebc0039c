//! `meshctl up --clickhouse-replicas 2` on ports of the test's own:
//! ZooKeeper and two ClickHouse replicas, the audit tables replicated on
//! both, the audit sink given both URLs; the demo's rows on both replicas;
//! `down` stops every one of them. Needs ZooKeeper
//! (`scripts/install-deps.sh --replicated`) and the services built beside
//! meshctl (`cargo test --workspace` builds them).

use std::path::Path;
use std::process::{Command, Output};

use testkit::{WAIT, eventually, free_port};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A ClickHouse HTTP port whose next port is free too (the second replica's).
fn port_pair() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no two free ports in a row")
}

/// `meshctl <args>` from the workspace root with `env` (and nothing of the
/// caller's stack settings).
async fn meshctl(env: Vec<(&'static str, String)>, args: &[&str]) -> anyhow::Result<Output> {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    Ok(tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        cmd.args(&args)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
        for var in [
            "NATS_URL",
            "CLICKHOUSE_URL",
            "AGENTMESH_AUDIT_DATABASE",
            "NATS_NKEY_SEED_FILE",
            "NATS_CREDS",
            "CLICKHOUSE_USER",
            "CLICKHOUSE_PASSWORD",
            "AGENTMESH_POLICIES",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env).output()
    })
    .await??)
}

#[tokio::test]
async fn up_with_two_clickhouse_replicas_replicates_the_audit_tables_and_down_stops_them()
-> anyhow::Result<()> {
    let bin = Path::new(env!("CARGO_BIN_EXE_meshctl"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    anyhow::ensure!(
        bin.join("policy-worker").is_file() && bin.join("audit-sink").is_file(),
        "policy-worker and audit-sink are not built beside meshctl in `{}`: `cargo build --workspace`",
        bin.display()
    );
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("state");
    let ch_port = port_pair()?;
    let urls = [
        format!("http://127.0.0.1:{ch_port}"),
        format!("http://127.0.0.1:{}", ch_port + 1),
    ];
    let env = vec![
        ("NATS_URL", format!("nats://127.0.0.1:{}", free_port()?)),
        ("CLICKHOUSE_URL", urls[0].clone()),
        ("AGENTMESH_HOME", home.display().to_string()),
        ("AGENTMESH_CLICKHOUSE_TCP_PORT", free_port()?.to_string()),
        ("AGENTMESH_ZOOKEEPER_PORT", free_port()?.to_string()),
    ];
    let up = meshctl(
        env.clone(),
        &[
            "up",
            "--detach",
            "--clickhouse-replicas",
            "2",
            "--without",
            "gpu-scaler",
        ],
    )
    .await?;
    let out = format!("{}{}", text(&up.stdout), text(&up.stderr));
    let checks = async {
        anyhow::ensure!(up.status.success(), "meshctl up failed:\n{out}");
        assert!(out.contains("zookeeper          started"), "{out}");
        assert!(out.contains("replica ch-1"), "{out}");
        assert!(
            out.contains("clickhouse-server-2 started") && out.contains("replica ch-2"),
            "{out}"
        );
        assert!(out.contains("replicated on 2 replicas"), "{out}");
        assert!(out.contains("audit-sink         ready"), "{out}");

        // The sink was given both replicas and the flag.
        let pid = std::fs::read_to_string(home.join("run/audit-sink.pid"))?;
        let pid = pid.lines().next().unwrap_or_default().trim().to_owned();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?.replace('\0', " ");
        assert!(
            cmdline.contains(&format!("--clickhouse-url {},{}", urls[0], urls[1]))
                && cmdline.contains("--clickhouse-replicated"),
            "{cmdline}"
        );

        // `status` shows ZooKeeper and the second replica.
        let status = meshctl(env.clone(), &["status"]).await?;
        let status_out = text(&status.stdout);
        assert!(status.status.success(), "{status_out}");
        assert!(
            status_out.contains("zookeeper          up")
                && status_out.contains(&format!("clickhouse-server-2 up       {}", urls[1])),
            "{status_out}"
        );

        // The demo's decisions reach both replicas, whose tables are replicated.
        let demo = meshctl(env.clone(), &["demo"]).await?;
        assert!(
            demo.status.success(),
            "{}{}",
            text(&demo.stdout),
            text(&demo.stderr)
        );
        let secrets: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(home.join("auth/clickhouse.json"))?)?;
        for url in &urls {
            let reader = clickhouse::Client::default()
                .with_url(url)
                .with_validation(false)
                .with_user("agentmesh_reader")
                .with_password(secrets["reader"].as_str().unwrap_or_default());
            let engine = testkit::clickhouse::query_text(
                &reader,
                "SELECT engine FROM system.tables WHERE database = 'agentmesh' AND name = 'decisions'",
            )
            .await?;
            assert_eq!(engine.trim(), "ReplicatedReplacingMergeTree", "{url}");
            eventually(
                WAIT,
                &format!("the demo's 11 decisions on {url}"),
                || async {
                    let rows = testkit::clickhouse::query_text(
                        &reader,
                        "SELECT count() FROM agentmesh.decisions FINAL",
                    )
                    .await
                    .ok()?;
                    (rows.trim().parse::<u64>().ok()? >= 11).then_some(())
                },
            )
            .await?;
        }
        anyhow::Ok(())
    };
    let checks = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;
    let down = meshctl(env.clone(), &["down"]).await?;
    match checks {
        Ok(result) => result?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    let out = text(&down.stdout);
    assert!(down.status.success(), "{out}");
    for name in [
        "clickhouse-server ",
        "clickhouse-server-2",
        "zookeeper",
        "nats-server",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(name) && l.contains("stopped")),
            "{name} not stopped:\n{out}"
        );
    }
    Ok(())
}

//! `meshctl` as a user runs it: the demo's decision tree and `meshctl
//! trace`, against a real policy worker, audit sink, NATS and ClickHouse;
//! `up --detach` / `status` / `down` on ports of the test's own, with
//! authorization (the default: the demo with per-agent keys, refused
//! anonymous clients, `agents add|remove|list` on the running broker) and
//! `--insecure`; the errors for a taken port and a missing server binary.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use support::services::{Services, workspace};
use testkit::{WAIT, eventually, free_port};

/// `meshctl <args>` with the environment pointing at the test's servers.
fn meshctl(env: &[(&str, &str)], args: &[&str]) -> std::io::Result<Output> {
    meshctl_command(env, args).output()
}

/// [`meshctl`]'s command, not yet run.
fn meshctl_command(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args).current_dir(workspace());
    for var in [
        "NATS_URL",
        "CLICKHOUSE_URL",
        "AGENTMESH_AUDIT_DATABASE",
        "AGENTMESH_HOME",
        "NATS_SERVER_BIN",
        "CLICKHOUSE_SERVER_BIN",
        "NATS_NKEY_SEED_FILE",
        "NATS_CREDS",
        "CLICKHOUSE_USER",
        "CLICKHOUSE_PASSWORD",
        "AGENTMESH_POLICIES",
        "AGENTMESH_DURABILITY",
        "NATS_MONITORING_URL",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The tree block of meshctl's output: the header and the step lines.
fn tree_block(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("Decision tree of trace"))
        .take_while(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The demo's tree, all of it but the trace id: one line per step, indented
/// by causation (the two tool calls hang off the coder's reasoning; the
/// memory update follows the tool's result), with agent, type, target/tool
/// and the decision; the denial marked with the policies that made it.
fn expected_tree(trace_id: &str) -> Vec<String> {
    vec![
        format!("Decision tree of trace {trace_id}: 11 steps, 1 denied"),
        "  planner   prompt                                        allow  (members-record-steps)".to_owned(),
        "  └─ planner   reasoning                                  allow  (members-record-steps)".to_owned(),
        "     └─ planner   task.handoff → coder                    allow  (orchestrators-hand-off)".to_owned(),
        "        └─ coder     reasoning                            allow  (members-record-steps)".to_owned(),
        "           ├─ coder     tool.call code.search → coder     allow  (members-call-low-risk-tools)".to_owned(),
        "           │  └─ coder     tool.result → coder            allow  (members-message-members)".to_owned(),
        "           │     └─ coder     memory.update               allow  (members-record-steps)".to_owned(),
        "           │        └─ coder     task.handoff → reviewer  allow  (workers-hand-off-to-review)".to_owned(),
        "           │           └─ reviewer  reasoning             allow  (members-record-steps)".to_owned(),
        "           │              └─ reviewer  output             allow  (members-record-steps)".to_owned(),
        "           └─ coder     tool.call shell.exec              DENY   by forbid-high-risk-tools, forbid-shell-exec".to_owned(),
    ]
}

/// Runs `meshctl demo` and returns what it printed, failing if it failed.
async fn run_demo(env: &[(&str, &str)]) -> anyhow::Result<String> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let demo = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        meshctl(&env, &["demo", "--timeout-secs", "60"])
    })
    .await??;
    let stdout = text(&demo.stdout);
    anyhow::ensure!(
        demo.status.success(),
        "meshctl demo failed:\n{stdout}\n{}",
        text(&demo.stderr)
    );
    Ok(stdout)
}

fn trace_of(stdout: &str) -> anyhow::Result<String> {
    Ok(stdout
        .lines()
        .find_map(|l| l.strip_prefix("Again: meshctl trace "))
        .ok_or_else(|| anyhow::anyhow!("demo names no trace:\n{stdout}"))?
        .trim()
        .to_owned())
}

#[tokio::test]
async fn demo_prints_the_tree_and_trace_prints_it_again() -> anyhow::Result<()> {
    let services = Services::start("meshctl").await?;
    let (nats, ch, db, tmp) = (&services.nats, services.ch(), services.db(), &services.tmp);

    let (nats_url, ch_url) = (nats.url(), ch.url());
    let home = tmp.path().join("home");
    let home = home.to_string_lossy();
    let env = [
        ("NATS_URL", nats_url.as_str()),
        ("CLICKHOUSE_URL", ch_url.as_str()),
        ("AGENTMESH_AUDIT_DATABASE", db),
        ("AGENTMESH_HOME", &home),
    ];
    // Work of another workflow waiting for `coder` before the demo starts:
    // the demo's coder must leave it for the real one, not consume it.
    let earlier = agents_sdk::Agent::connect("planner", nats.url()).await?;
    let stale = earlier
        .workflow()
        .handoff("coder", "an earlier task")
        .await?;
    let receipt = earlier.await_decision(&stale.id).await?;
    assert_eq!(receipt.decision, agents_sdk::Decision::Allow);
    drop(earlier);

    let stdout = run_demo(&env).await?;
    let trace_id = trace_of(&stdout)?;

    // What the SDK agents did, as they did it: the planner's handoff was
    // allowed, the coder's own tool handler answered code.search, shell.exec
    // came back as the SDK's typed denial, the reviewer approved.
    for line in [
        format!("Trace {trace_id}: planner → coder → reviewer, agents-sdk agents"),
        "  planner   task.handoff → coder: allowed by orchestrators-hand-off".to_owned(),
        "  coder     code.search \"fn signup\" → src/handlers/signup.rs:11 (served by coder)"
            .to_owned(),
        "  coder     shell.exec denied by forbid-high-risk-tools, forbid-shell-exec (the SDK's typed denial)"
            .to_owned(),
        "  reviewer  approved: Validation of the email and password added to src/handlers/signup.rs."
            .to_owned(),
        format!("Published 11 steps of trace {trace_id}; waiting for their decisions in ClickHouse…"),
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing `{line}`:\n{stdout}");
    }

    // The whole tree.
    let tree = tree_block(&stdout);
    assert_eq!(tree, expected_tree(&trace_id), "{stdout}");

    // Published by the agents themselves on their own ingress subjects, and
    // the tool result is what the coder's tool handler computed.
    let client = clickhouse::Client::default()
        .with_url(ch.url())
        .with_validation(false);
    let subjects = testkit::clickhouse::query_text(
        &client,
        &format!(
            "SELECT agent, ingress_subject FROM `{db}`.events FINAL WHERE trace_id = '{trace_id}' ORDER BY time_us"
        ),
    )
    .await?;
    let expected_subjects = "\
planner\tmesh.ingress.planner.prompt
planner\tmesh.ingress.planner.reasoning
planner\tmesh.ingress.planner.task_handoff
coder\tmesh.ingress.coder.reasoning
coder\tmesh.ingress.coder.tool_call
coder\tmesh.ingress.coder.tool_result
coder\tmesh.ingress.coder.tool_call
coder\tmesh.ingress.coder.memory_update
coder\tmesh.ingress.coder.task_handoff
reviewer\tmesh.ingress.reviewer.reasoning
reviewer\tmesh.ingress.reviewer.output
";
    assert_eq!(subjects, expected_subjects);
    let result = testkit::clickhouse::query_text(
        &client,
        &format!(
            "SELECT data FROM `{db}`.events FINAL WHERE trace_id = '{trace_id}' AND type = 'io.agentmesh.tool.result'"
        ),
    )
    .await?;
    // TabSeparated escapes only tabs, newlines and backslashes, which this
    // JSON does not contain.
    let result: serde_json::Value = serde_json::from_str(result.trim())?;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        result["result"]["matches"][0]["file"], "src/handlers/signup.rs",
        "{result}"
    );

    let again = meshctl(&env, &["trace", &trace_id])?;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        tree_block(&text(&again.stdout)),
        tree,
        "meshctl trace prints the demo's tree"
    );

    let missing = meshctl(
        &env,
        &["trace", "0123456789abcdef0123456789abcdef", "--wait", "1s"],
    )?;
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains(&format!(
            "no steps of trace 0123456789abcdef0123456789abcdef in `{db}.events` after 1s"
        )),
        "{}",
        text(&missing.stderr)
    );
    let bad = meshctl(&env, &["trace", "not-a-trace"])?;
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("is not a trace id"));

    // The earlier workflow's handoff is still waiting for the real coder.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let mut coder = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "agent-coder",
            schemas::subjects::STREAM_DELIVER,
        )
        .await?;
    let info = coder.info().await?;
    assert_eq!(
        info.num_pending + info.num_ack_pending as u64,
        1,
        "the demo's coder consumed another workflow's delivery: {info:?}"
    );

    // Again, on the same mesh: same durable consumers, a new trace, the same tree.
    let second = run_demo(&env).await?;
    let second_trace = trace_of(&second)?;
    assert_ne!(second_trace, trace_id);
    assert_eq!(
        tree_block(&second),
        expected_tree(&second_trace),
        "{second}"
    );

    services.stop().await
}

/// `up`'s flags for the servers alone, without any service.
const SERVERS_ONLY: [&str; 8] = [
    "--without",
    "policy-worker",
    "--without",
    "audit-sink",
    "--without",
    "gpu-scaler",
    "--without",
    "mcp-gateway",
];

/// Environment for a stack of the test's own under `home`.
struct LocalStack {
    nats_url: String,
    ch_url: String,
    home: String,
    tcp_port: String,
}

impl LocalStack {
    fn new(home: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            nats_url: format!("nats://127.0.0.1:{}", free_port()?),
            ch_url: format!("http://127.0.0.1:{}", free_port()?),
            home: home.to_string_lossy().into_owned(),
            tcp_port: free_port()?.to_string(),
        })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("NATS_URL", self.nats_url.as_str()),
            ("CLICKHOUSE_URL", self.ch_url.as_str()),
            ("AGENTMESH_HOME", self.home.as_str()),
            ("AGENTMESH_CLICKHOUSE_TCP_PORT", self.tcp_port.as_str()),
        ]
    }

    /// The environment and `args` as owned strings, for a blocking task.
    fn owned(&self, args: &[&str]) -> (Vec<(String, String)>, Vec<String>) {
        let env = self
            .env()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (env, args.iter().map(|s| s.to_string()).collect())
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let (env, args) = self.owned(args);
        Ok(tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            meshctl(&env, &args)
        })
        .await??)
    }

    /// Runs `meshctl args` with its stdout a pipe nobody reads any more
    /// (`meshctl … | head -0`); killed if it runs past [`WAIT`].
    async fn run_into_closed_pipe(&self, args: &[&str]) -> anyhow::Result<Output> {
        let (env, args) = self.owned(args);
        tokio::task::spawn_blocking(move || -> anyhow::Result<Output> {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (reader, writer) = std::io::pipe()?;
            drop(reader);
            let mut child = meshctl_command(&env, &args)
                .stdin(std::process::Stdio::null())
                .stdout(writer)
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            let deadline = std::time::Instant::now() + WAIT;
            while child.try_wait()?.is_none() {
                if std::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    anyhow::bail!("`meshctl {}` still ran after {WAIT:?}", args.join(" "));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(child.wait_with_output()?)
        })
        .await?
    }

    /// Runs `meshctl args`: whether it succeeded, and its stdout then stderr.
    async fn run_text(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let out = self.run(args).await?;
        Ok((
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        ))
    }

    /// Runs `checks` on the running stack, then `meshctl down` whether they
    /// passed, failed or panicked (no servers outlive a failed test);
    /// returns what `down` printed once the checks passed.
    async fn down_after(
        &self,
        checks: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Output> {
        let checks = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;
        let down = self.run(&["down"]).await;
        match checks {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        down
    }
}

#[tokio::test]
async fn up_detach_starts_servers_applies_streams_and_schema_and_down_stops_them()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let stack = LocalStack::new(&tmp.path().join("state"))?;
    // The stack as it was before authorization: --insecure; events kept
    // 200 days in the streams.
    let mut args = vec![
        "up",
        "--detach",
        "--insecure",
        "--stream-max-age-days",
        "200",
    ];
    args.extend(SERVERS_ONLY);
    let up = stack.run(&args).await?;
    let out = text(&up.stdout);
    if !up.status.success() {
        let _ = stack.run(&["down"]).await;
        panic!("meshctl up failed:\n{out}\n{}", text(&up.stderr));
    }
    let checks = async {
        assert!(out.contains("nats-server        started"), "{out}");
        // The stack's default: every write fsynced before it is acknowledged.
        assert!(
            out.lines()
                .any(|l| l.starts_with("nats-server ") && l.contains("durability always")),
            "{out}"
        );
        assert!(out.contains("clickhouse-server  started"), "{out}");
        assert!(out.contains("schema             applied"), "{out}");

        // Both answer, with JetStream streams and the audit tables in place.
        let js = async_nats::jetstream::new(async_nats::connect(&stack.nats_url).await?);
        let mut ingress = js.get_stream(schemas::subjects::STREAM_INGRESS).await?;
        assert_eq!(
            ingress.info().await?.config.max_age,
            std::time::Duration::from_secs(200 * 24 * 3600)
        );
        let client = clickhouse::Client::default()
            .with_url(&stack.ch_url)
            .with_validation(false);
        let tables = testkit::clickhouse::query_text(
            &client,
            "SELECT name FROM system.tables WHERE database = 'agentmesh' ORDER BY name",
        )
        .await?;
        assert_eq!(tables, "decisions\nevents\ngpu_leases\nrejected\n");
        // The ClickHouse config meshctl wrote lives under the state directory.
        assert!(
            Path::new(&stack.home)
                .join("clickhouse/config.xml")
                .is_file()
        );

        // A second `up` finds them running and starts nothing.
        let again = stack.run(&args).await?;
        let out = text(&again.stdout);
        assert!(again.status.success(), "{out}");
        assert!(
            out.contains("nats-server        running")
                && out.contains("clickhouse-server  running"),
            "{out}"
        );

        // An `up` without the flag keeps the streams' 200 days.
        let plain: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| *a != "--stream-max-age-days" && *a != "200")
            .collect();
        let again = stack.run(&plain).await?;
        assert!(again.status.success(), "{}", text(&again.stdout));
        assert_eq!(
            ingress.info().await?.config.max_age,
            std::time::Duration::from_secs(200 * 24 * 3600)
        );

        let status = stack.run(&["status"]).await?;
        let out = text(&status.stdout);
        assert!(status.status.success(), "{out}");
        assert!(
            out.contains("nats-server        up") && out.contains("started by meshctl"),
            "{out}"
        );
        assert!(out.contains("clickhouse-server  up"), "{out}");
        // The node's own `/varz` says it fsyncs every write.
        assert!(
            out.lines()
                .any(|l| l.starts_with("durability         always")
                    && l.contains("(nats-server 2.")
                    && l.contains("every write fsynced")),
            "{out}"
        );
        let json = stack.run(&["status", "-o", "json"]).await?;
        let report: serde_json::Value = serde_json::from_slice(&json.stdout)?;
        assert_eq!(report["durability"][0]["sync"], "always", "{report}");
        assert!(
            report["durability"][0]["version"]
                .as_str()
                .is_some_and(|v| v.starts_with("2.")),
            "{report}"
        );
        assert!(out.contains("policy-worker      down"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("MESH_INGRESS") && l.contains(" 0")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("events") && l.trim_end().ends_with(" 0")),
            "{out}"
        );

        // Taken port: a server of ours is on the NATS port, but a second stack
        // pointed at it as ClickHouse finds a program that is not ClickHouse.
        let other = tempfile::tempdir()?;
        let nats_port = stack
            .nats_url
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        let not_clickhouse = format!("http://127.0.0.1:{nats_port}");
        let other_home = other.path().to_string_lossy();
        let taken = meshctl(
            &[
                ("NATS_URL", stack.nats_url.as_str()),
                ("CLICKHOUSE_URL", not_clickhouse.as_str()),
                ("AGENTMESH_HOME", &other_home),
            ],
            &args,
        )?;
        assert!(!taken.status.success());
        let err = text(&taken.stderr);
        assert!(
            err.contains(&format!("port {nats_port} on 127.0.0.1 is taken")),
            "{err}"
        );
        anyhow::Ok(())
    };
    let down = stack.down_after(checks).await?;
    let out = text(&down.stdout);
    assert!(down.status.success(), "{out}");
    assert!(
        out.contains("clickhouse-server  stopped") && out.contains("nats-server        stopped"),
        "{out}"
    );
    let status = stack.run(&["status"]).await?;
    assert!(
        !status.status.success(),
        "status fails with the servers down"
    );
    let out = text(&status.stdout);
    assert!(
        out.contains("nats-server        down") && out.contains("clickhouse-server  down"),
        "{out}"
    );
    Ok(())
}

/// A reader that goes before `up` printed a line cuts nothing short: a
/// foreground `up` brings the stack up, finds nobody reading, stops what it
/// started and ends with 141; a detached one leaves the whole stack up and
/// ends with 141; so does `down`, with everything stopped.
#[tokio::test]
async fn a_closed_stdout_cuts_neither_up_nor_down_short() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let stack = LocalStack::new(&tmp.path().join("state"))?;
    let mut args = vec!["up", "--insecure"];
    args.extend(SERVERS_ONLY);
    let up = stack.run_into_closed_pipe(&args).await;
    let down = stack.run(&["down"]).await?;
    let up = up?;
    assert_eq!(up.status.code(), Some(141), "{}", text(&up.stderr));
    assert!(
        text(&down.stdout).contains("Nothing to stop"),
        "the foreground `up` left servers running: {}",
        text(&down.stdout)
    );

    args.push("--detach");
    let up = stack.run_into_closed_pipe(&args).await?;
    let checks = async {
        assert_eq!(up.status.code(), Some(141), "{}", text(&up.stderr));
        let status = stack.run(&["status"]).await?;
        let out = text(&status.stdout);
        assert!(status.status.success(), "{out}");
        assert!(
            out.contains("nats-server        up") && out.contains("clickhouse-server  up"),
            "{out}"
        );
        let down = stack.run_into_closed_pipe(&["down"]).await?;
        assert_eq!(down.status.code(), Some(141), "{}", text(&down.stderr));
        let again = stack.run(&["down"]).await?;
        assert!(
            text(&again.stdout).contains("Nothing to stop"),
            "{}",
            text(&again.stdout)
        );
        Ok(())
    };
    stack.down_after(checks).await?;
    Ok(())
}

#[tokio::test]
async fn missing_server_binary_names_the_install_script() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let stack = LocalStack::new(tmp.path())?;
    let mut env = stack.env();
    env.push(("NATS_SERVER_BIN", "/nonexistent/nats-server"));
    let out = tokio::task::spawn_blocking({
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            meshctl(&env, &["up", "--detach"])
        }
    })
    .await??;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("`NATS_SERVER_BIN` is `/nonexistent/nats-server`, which is not a file")
            && err.contains("scripts/install-deps.sh"),
        "{err}"
    );
    Ok(())
}

/// A nats-server too old to fsync each write (2.9, faked by a script that
/// answers `--version` as Debian's does) is refused under the default
/// durability, with the fix; nothing is left running.
#[tokio::test]
async fn a_nats_server_that_cannot_fsync_each_write_is_refused_by_default() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let stack = LocalStack::new(&tmp.path().join("state"))?;
    let fake = tmp.path().join("nats-server");
    std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.9.10'\n")?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let fake = fake.display().to_string();
    let mut env: Vec<(String, String)> = stack
        .env()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("NATS_SERVER_BIN".into(), fake.clone()));
    let out = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        meshctl(&env, &["up", "--detach", "--insecure"])
    })
    .await??;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "`{fake}` is nats-server 2.9.10, which cannot fsync each write"
        )) && err.contains("scripts/install-deps.sh")
            && err.contains("--durability interval"),
        "{err}"
    );
    let _ = stack.run(&["down"]).await;
    Ok(())
}

/// The signing keys `meshctl up` made (`up_out` is its output): one seed
/// file per signing service, mode 0600, each key active in `mesh-signers`
/// and signing what the demo decided, so `meshctl audit verify` is `ok`.
/// Then `meshctl signers`: a rotated key is retired and the receipts it
/// signed still verify; a key added by hand is listed, then retired; a
/// string that is not a public key is refused with the reason.
async fn signing_keys_from_up_rotate_and_still_verify(
    stack: &LocalStack,
    auth: &Path,
    up_out: &str,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;

    let public_of = |service: &str| -> anyhow::Result<String> {
        let seed = std::fs::read_to_string(auth.join("signing").join(format!("{service}.nk")))?;
        Ok(schemas::signing::SigningKey::from_seed(seed.trim())?
            .public_key()
            .to_owned())
    };
    for service in ["policy-worker", "audit-sink"] {
        let file = auth.join("signing").join(format!("{service}.nk"));
        assert_eq!(
            std::fs::metadata(&file)?.permissions().mode() & 0o777,
            0o600,
            "{}",
            file.display()
        );
        let public = public_of(service)?;
        assert!(up_out.contains(&format!("{service} {public}")), "{up_out}");
    }
    let worker_key = public_of("policy-worker")?;
    let listed = |list: &str, key: &str, status: &str| {
        list.lines()
            .any(|l| l.starts_with(key) && l.split_whitespace().nth(1) == Some(status))
    };
    let (ok, list) = stack.run_text(&["signers", "list"]).await?;
    assert!(ok, "{list}");
    assert!(listed(&list, &worker_key, "active"), "{list}");
    assert!(listed(&list, &public_of("audit-sink")?, "active"), "{list}");

    // The demo's decisions, signed by the worker's key and checkpointed
    // by the sink's: the sink checkpoints on its batch period, so poll.
    let verified = eventually(WAIT, "`meshctl audit verify` ok", || async {
        let (ok, out) = stack.run_text(&["audit", "verify"]).await.ok()?;
        (ok && out.starts_with("ok: ")).then_some(out)
    })
    .await?;
    assert!(!verified.starts_with("ok: 0 decisions"), "{verified}");

    // Rotation: a new seed file, the old key retired as of now.
    let (ok, out) = stack
        .run_text(&["signers", "rotate", "policy-worker"])
        .await?;
    assert!(ok, "{out}");
    let rotated = public_of("policy-worker")?;
    assert_ne!(rotated, worker_key);
    assert!(
        out.contains(&format!("new signing key {rotated} (active)"))
            && out.contains(&format!("old key {worker_key} retired")),
        "{out}"
    );
    let (_, list) = stack.run_text(&["signers", "list"]).await?;
    assert!(listed(&list, &worker_key, "retired"), "{list}");
    assert!(listed(&list, &rotated, "active"), "{list}");
    // What the old key signed before its retirement still verifies.
    let (ok, out) = stack.run_text(&["audit", "verify"]).await?;
    assert!(ok && out.starts_with("ok: "), "{out}");

    // A signer added by hand (another replica's key), then retired.
    let replica = schemas::signing::SigningKey::generate();
    let replica_key = replica.public_key();
    let (ok, out) = stack
        .run_text(&["signers", "add", replica_key, "--name", "worker-2"])
        .await?;
    assert!(ok, "{out}");
    let (_, list) = stack.run_text(&["signers", "list"]).await?;
    assert!(
        listed(&list, replica_key, "active") && list.contains("worker-2"),
        "{list}"
    );
    let (ok, out) = stack.run_text(&["signers", "retire", replica_key]).await?;
    assert!(ok && out.contains("retired"), "{out}");
    let (_, list) = stack.run_text(&["signers", "list"]).await?;
    assert!(listed(&list, replica_key, "retired"), "{list}");
    let (ok, out) = stack
        .run_text(&["signers", "add", "not-a-key", "--name", "x"])
        .await?;
    assert!(
        !ok && out.contains("`not-a-key` is not an nkey public key"),
        "{out}"
    );
    Ok(())
}

/// A connection with the seed in `file`, recording server errors.
async fn connect_with_seed_file(
    url: &str,
    file: &Path,
) -> anyhow::Result<(async_nats::Client, Arc<Mutex<Vec<String>>>)> {
    let (seed, _) = broker_config::credentials::read_seed_file(file)?;
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let client = async_nats::ConnectOptions::new()
        .nkey(seed)
        .max_reconnects(1)
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event
                    && let Ok(mut v) = sink.lock()
                {
                    v.push(e.to_string());
                }
            }
        })
        .connect(url)
        .await?;
    Ok((client, errors))
}

/// Fails unless policy-worker and audit-sink were built beside meshctl
/// (`cargo test --workspace` builds them).
fn services_built() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_BIN_EXE_meshctl"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let present = |name: &str| dir.join(name).is_file();
    anyhow::ensure!(
        present("policy-worker") && present("audit-sink"),
        "policy-worker and audit-sink are not built beside meshctl in `{}`: build them (`cargo build --workspace`, or run `cargo test --workspace`) to run the whole stack",
        dir.display()
    );
    Ok(())
}

#[tokio::test]
async fn up_runs_the_services_built_beside_meshctl() -> anyhow::Result<()> {
    services_built()?;
    let tmp = tempfile::tempdir()?;
    let stack = LocalStack::new(&tmp.path().join("state"))?;
    let up = stack.run(&["up", "--detach"]).await?;
    let out = text(&up.stdout);
    if !up.status.success() {
        let _ = stack.run(&["down"]).await;
        panic!("meshctl up failed:\n{out}\n{}", text(&up.stderr));
    }
    let checks = async {
        assert!(
            out.contains("policy-worker      ready") && out.contains("audit-sink         ready"),
            "{out}"
        );
        // Authorization is on by default: keys for the operator, the
        // services and the agents of entities.json.
        assert!(
            out.contains("identities         applied  3 agents (coder, planner, reviewer)"),
            "{out}"
        );
        let auth = Path::new(&stack.home).join("auth");
        let status = stack.run(&["status"]).await?;
        let status_out = text(&status.stdout);
        assert!(status.status.success(), "{status_out}");
        assert!(status_out.contains("authorization      on"), "{status_out}");
        // `up` gave the worker the node's monitoring port: it read and
        // logged that the node fsyncs every write.
        let worker_log =
            std::fs::read_to_string(Path::new(&stack.home).join("logs/policy-worker.log"))?;
        assert!(
            worker_log.contains("NATS node fsyncs every write before acknowledging it."),
            "{worker_log}"
        );

        // Without a key nobody gets in.
        let anonymous = async_nats::ConnectOptions::new()
            .max_reconnects(1)
            .connect(&stack.nats_url)
            .await;
        assert!(anonymous.is_err(), "an anonymous client connected");
        // ClickHouse: `default` needs its password, the reader cannot write.
        let secrets: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(auth.join("clickhouse.json"))?)?;
        let anonymous = clickhouse::Client::default()
            .with_url(&stack.ch_url)
            .with_validation(false);
        assert!(
            testkit::clickhouse::query_text(&anonymous, "SELECT 1")
                .await
                .is_err()
        );
        let reader = anonymous
            .clone()
            .with_user("agentmesh_reader")
            .with_password(secrets["reader"].as_str().unwrap_or_default());
        let insert = reader
            .query("INSERT INTO agentmesh.gpu_leases (pool) VALUES ('forged')")
            .execute()
            .await;
        assert!(insert.is_err(), "the reader inserted");

        // The demo runs with each agent's own key.
        let demo = stack.run(&["demo"]).await?;
        let demo_out = text(&demo.stdout);
        assert!(demo.status.success(), "{demo_out}\n{}", text(&demo.stderr));
        let tree = tree_block(&demo_out);
        assert!(tree[0].contains(": 11 steps, 1 denied"), "{demo_out}");
        assert!(
            tree.last()
                .is_some_and(|l| l.contains("tool.call shell.exec")
                    && l.contains("DENY   by forbid-high-risk-tools, forbid-shell-exec")),
            "{demo_out}"
        );
        let rows = testkit::clickhouse::query_text(
            &reader,
            "SELECT count() FROM agentmesh.decisions FINAL",
        )
        .await?;
        assert!(rows.trim().parse::<u64>()? >= 11, "{rows}");

        signing_keys_from_up_rotate_and_still_verify(&stack, &auth, &out).await?;

        // `meshctl pub` as the planner, with its key: the worker's receipt.
        let published = stack
            .run(&[
                "pub",
                "--agent",
                "planner",
                "--type",
                "prompt",
                "--data",
                r#"{"text":"hello"}"#,
                "-o",
                "json",
            ])
            .await?;
        assert_eq!(
            published.status.code(),
            Some(0),
            "{}{}",
            text(&published.stdout),
            text(&published.stderr)
        );
        let receipt: serde_json::Value = serde_json::from_slice(&published.stdout)?;
        assert_eq!(receipt["decision"], "allow", "{receipt}");
        assert_eq!(receipt["agent"], "planner", "{receipt}");
        // With the agent's key alone (no operator key for meshctl): the
        // receipt comes over the agent's own subscription.
        let planner_key = auth.join("agents/planner.nk");
        let planner_key = planner_key.to_string_lossy();
        let alone = stack
            .run(&[
                "--nats-nkey-seed-file",
                &planner_key,
                "pub",
                "--agent",
                "planner",
                "--type",
                "reasoning",
                "-o",
                "json",
            ])
            .await?;
        assert_eq!(
            alone.status.code(),
            Some(0),
            "{}{}",
            text(&alone.stdout),
            text(&alone.stderr)
        );
        let receipt: serde_json::Value = serde_json::from_slice(&alone.stdout)?;
        assert_eq!(receipt["decision"], "allow", "{receipt}");

        // The coder's key publishes as the coder only.
        let (coder, errors) =
            connect_with_seed_file(&stack.nats_url, &auth.join("agents/coder.nk")).await?;
        coder
            .publish("mesh.ingress.planner.handoff", "{}".into())
            .await?;
        coder.flush().await?;
        eventually(WAIT, "the broker's permission error", || async {
            errors
                .lock()
                .ok()?
                .iter()
                .any(|e| {
                    e.contains(
                        "Permissions Violation for Publish to \"mesh.ingress.planner.handoff\"",
                    )
                })
                .then_some(())
        })
        .await?;

        // A second stack, `--insecure`, on this ClickHouse as `default`
        // with its password given as flags: the audit sink it starts
        // connects with them too.
        let other = LocalStack {
            ch_url: stack.ch_url.clone(),
            ..LocalStack::new(&tmp.path().join("other"))?
        };
        let password = secrets["admin"].as_str().unwrap_or_default();
        let other_up = other
            .run(&[
                "--clickhouse-user",
                "default",
                "--clickhouse-password",
                password,
                "up",
                "--detach",
                "--insecure",
                "--without",
                "policy-worker",
                "--without",
                "gpu-scaler",
            ])
            .await?;
        other
            .down_after(async {
                let other_out = text(&other_up.stdout);
                assert!(
                    other_up.status.success(),
                    "{other_out}\n{}",
                    text(&other_up.stderr)
                );
                assert!(
                    other_out.contains("clickhouse-server  running")
                        && other_out.contains("audit-sink         ready"),
                    "{other_out}"
                );
                anyhow::Ok(())
            })
            .await?;
        anyhow::Ok(())
    };
    let down = stack.down_after(checks).await?;
    let out = text(&down.stdout);
    for name in [
        "policy-worker",
        "audit-sink",
        "clickhouse-server",
        "nats-server",
    ] {
        assert!(out.contains(&format!("{name:<18} stopped")), "{out}");
    }
    Ok(())
}

#[tokio::test]
async fn agents_mcp_token_issues_replaces_and_revokes_a_bearer_token() -> anyhow::Result<()> {
    use broker_config::mcp_tokens::{TokenFile, token_digest};
    let tmp = tempfile::tempdir()?;
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    for entry in std::fs::read_dir(workspace().join("policies"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, policies.join(name))?;
        }
    }
    let policies_arg = policies.display().to_string();
    // No broker runs: the keys and tokens are files, the reload is skipped.
    let stack = LocalStack::new(&tmp.path().join("state"))?;
    let home = PathBuf::from(&stack.home);
    let tokens_file = home.join("auth/mcp-tokens.json");

    let add = stack
        .run(&[
            "agents",
            "add",
            "assistant",
            "--role",
            "orchestrator",
            "--attr",
            "team=platform",
            "--policies",
            &policies_arg,
            "--mcp-token",
        ])
        .await?;
    assert!(add.status.success(), "{}", text(&add.stderr));
    let token_path = home.join("auth/agents/assistant.mcp-token");
    assert!(
        text(&add.stdout).contains(&token_path.display().to_string()),
        "{}",
        text(&add.stdout)
    );
    let first = std::fs::read_to_string(&token_path)?.trim().to_owned();
    assert!(first.starts_with("amt_"), "{first}");
    let tokens = TokenFile::read(&tokens_file)?;
    assert_eq!(tokens.agent_for(&first), Some("assistant"));
    // The gateway's file holds the digest, never the token.
    assert!(!std::fs::read_to_string(&tokens_file)?.contains(&first));
    assert_eq!(tokens.agents["assistant"], token_digest(&first));

    // A new token replaces the old one.
    let again = stack
        .run(&["agents", "mcp-token", "assistant", "-o", "json"])
        .await?;
    assert!(again.status.success(), "{}", text(&again.stderr));
    let json: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    let second = json["token"].as_str().unwrap_or_default().to_owned();
    assert_ne!(second, first);
    assert_eq!(json["agent"], "assistant");
    let tokens = TokenFile::read(&tokens_file)?;
    assert_eq!(tokens.agent_for(&second), Some("assistant"));
    assert_eq!(tokens.agent_for(&first), None);

    // Only a registered agent gets one.
    let stranger = stack.run(&["agents", "mcp-token", "stranger"]).await?;
    assert!(!stranger.status.success());
    assert!(
        text(&stranger.stderr).contains("meshctl agents add stranger"),
        "{}",
        text(&stranger.stderr)
    );

    // Removing the agent revokes its token.
    let remove = stack
        .run(&["agents", "remove", "assistant", "--policies", &policies_arg])
        .await?;
    assert!(remove.status.success(), "{}", text(&remove.stderr));
    assert!(text(&remove.stdout).contains("MCP token of `assistant` revoked"));
    assert_eq!(TokenFile::read(&tokens_file)?.agent_for(&second), None);
    assert!(!token_path.exists());
    Ok(())
}

#[tokio::test]
async fn agents_add_and_remove_change_the_running_broker_and_the_entities() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    for entry in std::fs::read_dir(workspace().join("policies"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, policies.join(name))?;
        }
    }
    let policies_arg = policies.display().to_string();
    let stack = LocalStack::new(&tmp.path().join("state"))?;
    let mut args = vec!["up", "--detach", "--policies", &policies_arg];
    args.extend(SERVERS_ONLY);
    let up = stack.run(&args).await?;
    if !up.status.success() {
        let _ = stack.run(&["down"]).await;
        panic!(
            "meshctl up failed:\n{}\n{}",
            text(&up.stdout),
            text(&up.stderr)
        );
    }
    let home = PathBuf::from(&stack.home);
    let checks = async {
        let admin = connect_with_seed_file(&stack.nats_url, &home.join("auth/keys/meshctl.nk"))
            .await?
            .0;
        let admin = async_nats::jetstream::new(admin);
        let entities = || -> anyhow::Result<String> {
            Ok(std::fs::read_to_string(policies.join("entities.json"))?)
        };
        let original = entities()?;

        // Refused before anything is written: an attribute the schema needs
        // is missing, or the role does not exist.
        let bad = stack
            .run(&[
                "agents",
                "add",
                "analyst",
                "--role",
                "worker",
                "--policies",
                &policies_arg,
            ])
            .await?;
        assert!(!bad.status.success());
        let err = text(&bad.stderr);
        assert!(
            err.contains("do not validate") && err.contains("does not conform to the schema"),
            "{err}"
        );
        let bad = stack
            .run(&[
                "agents",
                "add",
                "analyst",
                "--role",
                "wizard",
                "--attr",
                "team=data",
                "--policies",
                &policies_arg,
            ])
            .await?;
        assert!(
            text(&bad.stderr).contains("is not a role"),
            "{}",
            text(&bad.stderr)
        );
        assert_eq!(entities()?, original);
        assert!(!home.join("auth/agents/analyst.nk").exists());

        let add = stack
            .run(&[
                "agents",
                "add",
                "analyst",
                "--role",
                "worker",
                "--attr",
                "team=data",
                "--policies",
                &policies_arg,
            ])
            .await?;
        let out = text(&add.stdout);
        assert!(add.status.success(), "{out}\n{}", text(&add.stderr));
        assert!(out.contains("nats-server reloaded"), "{out}");
        // Probing the new key before the reload took is no error to show.
        assert_eq!(text(&add.stderr), "", "{out}");
        let seed_file = home.join("auth/agents/analyst.nk");
        // The lines to run it with its key, for both SDKs.
        let seed = seed_file.display();
        assert!(
            out.lines().any(|l| l
                .trim_start()
                .starts_with(&format!("export AGENTMESH_NKEY_FILE={seed} "))),
            "{out}"
        );
        assert!(
            out.contains(&format!("nkey_seed_file=\"{seed}\")")),
            "{out}"
        );
        // `meshctl pub` publishes with that key (no worker runs here:
        // `--no-wait`); an agent without a key gets one line and exit 5.
        let published = stack
            .run(&[
                "pub",
                "--agent",
                "analyst",
                "--type",
                "reasoning",
                "--no-wait",
            ])
            .await?;
        let pub_out = text(&published.stdout);
        assert_eq!(
            published.status.code(),
            Some(0),
            "{pub_out}{}",
            text(&published.stderr)
        );
        assert!(
            pub_out.contains("as analyst on mesh.ingress.analyst.reasoning"),
            "{pub_out}"
        );
        let nobody = stack
            .run(&["pub", "--agent", "nobody", "--type", "reasoning"])
            .await?;
        let err = text(&nobody.stderr);
        assert_eq!(nobody.status.code(), Some(5), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("meshctl agents add nobody --role"), "{err}");
        let tail = stack
            .run(&["tail", "receipts", "--agent", "nobody", "--count", "1"])
            .await?;
        let err = text(&tail.stderr);
        assert_eq!(tail.status.code(), Some(5), "{err}");
        assert!(err.contains("no agent `nobody` is registered"), "{err}");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&seed_file)?.permissions().mode() & 0o777,
            0o600
        );
        let added: serde_json::Value = serde_json::from_str(&entities()?)?;
        let analyst = added
            .as_array()
            .and_then(|a| a.iter().find(|e| e["uid"]["id"] == "analyst"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            analyst["attrs"],
            serde_json::json!({"role": "worker", "team": "data"})
        );
        // The new key works at once (no restart), with its durable in place.
        let (analyst, _) = connect_with_seed_file(&stack.nats_url, &seed_file).await?;
        let ack = async_nats::jetstream::new(analyst.clone())
            .publish("mesh.ingress.analyst.step", "{}".into())
            .await?
            .await?;
        assert_eq!(ack.stream, "MESH_INGRESS");
        admin
            .get_stream("MESH_DELIVER")
            .await?
            .consumer_info("agent-analyst")
            .await?;
        let again = stack
            .run(&[
                "agents",
                "add",
                "analyst",
                "--role",
                "worker",
                "--attr",
                "team=data",
                "--policies",
                &policies_arg,
            ])
            .await?;
        assert!(text(&again.stderr).contains("already registered"));

        let list = stack
            .run(&["agents", "list", "--policies", &policies_arg])
            .await?;
        let out = text(&list.stdout);
        for id in ["analyst", "coder", "planner", "reviewer"] {
            assert!(
                out.lines().any(|l| l.starts_with(id) && l.contains(".nk")),
                "{out}"
            );
        }

        // Rotation: the old key is refused, the new one works, the durable stays.
        let old_seed = std::fs::read_to_string(&seed_file)?;
        let rotate = stack.run(&["agents", "rotate", "analyst"]).await?;
        let out = text(&rotate.stdout);
        assert!(rotate.status.success(), "{out}\n{}", text(&rotate.stderr));
        assert!(out.contains("the old key is refused"), "{out}");
        assert_eq!(text(&rotate.stderr), "", "{out}");
        assert_ne!(std::fs::read_to_string(&seed_file)?, old_seed);
        eventually(WAIT, "the old connection to close", || async {
            (analyst.connection_state() != async_nats::connection::State::Connected).then_some(())
        })
        .await?;
        let (analyst, _) = connect_with_seed_file(&stack.nats_url, &seed_file).await?;
        async_nats::jetstream::new(analyst.clone())
            .publish("mesh.ingress.analyst.step", "{}".into())
            .await?
            .await?;
        admin
            .get_stream("MESH_DELIVER")
            .await?
            .consumer_info("agent-analyst")
            .await?;

        let remove = stack
            .run(&["agents", "remove", "analyst", "--policies", &policies_arg])
            .await?;
        let out = text(&remove.stdout);
        assert!(remove.status.success(), "{out}\n{}", text(&remove.stderr));
        assert!(out.contains("key is refused"), "{out}");
        assert_eq!(text(&remove.stderr), "", "{out}");
        // The file is back as its author wrote it, byte for byte.
        assert_eq!(entities()?, original);
        assert!(!seed_file.exists());
        // The open connection was closed, and the consumer is gone.
        eventually(WAIT, "the analyst's connection to close", || async {
            (analyst.connection_state() != async_nats::connection::State::Connected).then_some(())
        })
        .await?;
        assert!(
            admin
                .get_stream("MESH_DELIVER")
                .await?
                .consumer_info("agent-analyst")
                .await
                .is_err()
        );
        let list = stack
            .run(&["agents", "list", "--policies", &policies_arg])
            .await?;
        assert!(!text(&list.stdout).contains("analyst"));
        anyhow::Ok(())
    };
    stack.down_after(checks).await?;
    Ok(())
}

/// Two agents that number their events `1`, `2`, `3` in one trace: every
/// step keeps its own row and `meshctl trace` links each to the right
/// parent, by `causationsource` where the step names it.
#[tokio::test]
async fn trace_draws_two_agents_that_count_ids_from_one() -> anyhow::Result<()> {
    use schemas::{EventBuilder, EventBuilderV10};

    let services = Services::start("meshctl_ids").await?;
    let (nats, ch, db, tmp) = (&services.nats, services.ch(), services.db(), &services.tmp);

    let js = async_nats::jetstream::new(nats.connect().await?);
    let trace = schemas::TraceParent::mint();
    let trace_id = trace.trace_id_hex();
    // (agent, id, type, target, causationid, causationsource)
    type Step<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
    );
    let steps: [Step; 6] = [
        ("planner", "1", "prompt", None, None, None),
        (
            "planner",
            "2",
            "task.handoff",
            Some("coder"),
            Some("1"),
            Some("planner"),
        ),
        ("coder", "1", "reasoning", None, Some("2"), Some("planner")),
        ("coder", "2", "observation", None, Some("1"), Some("coder")),
        (
            "coder",
            "3",
            "message",
            Some("planner"),
            Some("2"),
            Some("coder"),
        ),
        ("planner", "3", "output", None, Some("3"), Some("coder")),
    ];
    let start = chrono::Utc::now();
    for (n, (agent, id, ty, target, cause, cause_agent)) in steps.into_iter().enumerate() {
        let mut event = EventBuilderV10::new()
            .id(id)
            .source(format!("/agents/{agent}"))
            .ty(format!("io.agentmesh.{ty}"))
            .time(start + chrono::Duration::milliseconds(n as i64))
            .extension("traceparent", trace.to_string())
            .data("application/json", serde_json::json!({"step": n}));
        if let Some(target) = target {
            event = event.extension("target", target);
        }
        if let Some(cause) = cause {
            event = event.extension("causationid", cause);
        }
        if let Some(cause_agent) = cause_agent {
            event = event.extension("causationsource", format!("/agents/{cause_agent}"));
        }
        let (headers, payload) = schemas::encode_binary(&event.build()?);
        js.publish_with_headers(
            schemas::subjects::ingress(agent, ty.replace('.', "_").as_str()),
            headers,
            payload,
        )
        .await?
        .await?;
    }

    // A home of the test's own: credentials of a local stack in the
    // repository's `.agentmesh/` must not reach the test's servers.
    let (nats_url, ch_url) = (nats.url(), ch.url());
    let home = tmp.path().join("home");
    let home = home.to_string_lossy();
    let env = [
        ("NATS_URL", nats_url.as_str()),
        ("CLICKHOUSE_URL", ch_url.as_str()),
        ("AGENTMESH_AUDIT_DATABASE", db),
        ("AGENTMESH_HOME", &home),
    ];
    let last = std::sync::Mutex::new(String::new());
    let tree = eventually(WAIT, "six decided steps in the tree", || async {
        let out = meshctl(&env, &["trace", &trace_id]).ok()?;
        let tree = tree_block(&text(&out.stdout));
        if let Ok(mut last) = last.lock() {
            *last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        }
        (tree.first()?.contains(": 6 steps, 0 denied")
            && !tree.iter().any(|l| l.contains("no decision yet")))
        .then_some(tree)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; meshctl trace said last:\n{}",
            last.lock().map(|l| l.clone()).unwrap_or_default()
        )
    })?;
    let shape: Vec<String> = tree[1..]
        .iter()
        .map(|l| l.split("  allow").next().unwrap_or(l).trim_end().to_owned())
        .collect();
    assert_eq!(
        shape,
        [
            "  planner   prompt",
            "  └─ planner   task.handoff → coder",
            "     └─ coder     reasoning",
            "        └─ coder     observation",
            "           └─ coder     message → planner",
            "              └─ planner   output",
        ],
        "{tree:#?}"
    );

    services.stop().await
}

/// A first client port with room above it for a 3-node cluster: the ports
/// of the three nodes, their routes (+2000) and monitoring (+4000), all free.
fn cluster_first_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        let all_free = [0u16, 2000, 4000].iter().all(|offset| {
            (0..3u16).all(|i| {
                port.checked_add(offset + i)
                    .is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            })
        });
        if all_free {
            return Ok(port);
        }
    }
    anyhow::bail!("no free first port for a 3-node cluster")
}

#[tokio::test]
async fn up_with_three_nats_nodes_runs_a_cluster_that_status_shows_node_by_node()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut stack = LocalStack::new(&tmp.path().join("state"))?;
    let first = cluster_first_port()?;
    stack.nats_url = format!("nats://127.0.0.1:{first}");
    // The operator's choice of the faster setting: every node runs it and
    // status says what each loses.
    let mut args = vec![
        "up",
        "--detach",
        "--nats-nodes",
        "3",
        "--durability",
        "interval",
    ];
    args.extend(SERVERS_ONLY);
    let up = stack.run(&args).await?;
    let out = text(&up.stdout);
    if !up.status.success() {
        let _ = stack.run(&["down"]).await;
        panic!("meshctl up failed:\n{out}\n{}", text(&up.stderr));
    }
    let home = PathBuf::from(&stack.home);
    let checks = async {
        for name in ["nats-server ", "nats-server-2", "nats-server-3"] {
            assert!(
                out.lines()
                    .any(|l| l.starts_with(name) && l.contains("started")),
                "{out}"
            );
        }
        assert!(out.contains("at 3 replica(s)"), "{out}");

        // Every node runs the accounts: the operator's key reaches
        // JetStream on each, every stream has three replicas, and an
        // anonymous client is refused.
        let seed = home.join("auth/keys/meshctl.nk");
        for i in 0..3 {
            let url = format!("nats://127.0.0.1:{}", first + i);
            let (client, _) = connect_with_seed_file(&url, &seed).await?;
            let js = async_nats::jetstream::new(client);
            let mut stream = js.get_stream(schemas::subjects::STREAM_INGRESS).await?;
            assert_eq!(stream.info().await?.config.num_replicas, 3, "{url}");
        }
        let anonymous = async_nats::ConnectOptions::new()
            .max_reconnects(1)
            .connect(format!("nats://127.0.0.1:{}", first + 1))
            .await;
        assert!(anonymous.is_err(), "node 2 lets anonymous clients in");

        // Status: each node up, and each stream led by exactly one of them.
        let status = stack.run(&["status"]).await?;
        let shown = text(&status.stdout);
        assert!(status.status.success(), "{shown}");
        for node in ["nats-1", "nats-2", "nats-3"] {
            assert!(
                shown
                    .lines()
                    .any(|l| l.starts_with(&format!("nats {node}")) && l.contains(" up ")),
                "{shown}"
            );
        }
        for node in ["nats-1", "nats-2", "nats-3"] {
            assert!(
                shown
                    .lines()
                    .any(|l| l.starts_with("durability         interval")
                        && l.contains(&format!("{node} (nats-server"))
                        && l.contains("interval 120s; an OS crash or power cut")),
                "{shown}"
            );
        }
        let led: Vec<&str> = shown
            .lines()
            .filter(|l| l.starts_with("nats nats-"))
            .filter_map(|l| l.split_once("; leads ").map(|(_, led)| led))
            .flat_map(|led| led.split(", "))
            .collect();
        for stream in ["MESH_INGRESS", "MESH_DELIVER", "MESH_DECISION"] {
            let leaders = led.iter().filter(|s| **s == stream).count();
            assert_eq!(leaders, 1, "{stream}: {shown}");
        }
        println!("{shown}");

        // Node 3 killed: status says so, and the other two still serve.
        let pid = std::fs::read_to_string(home.join("run/nats-server-3.pid"))?;
        let pid = pid.lines().next().unwrap_or_default().trim().to_owned();
        assert!(Command::new("kill").args(["-9", &pid]).status()?.success());
        // (Right after the kill the two left may be electing leaders.)
        let shown = eventually(
            WAIT,
            "status to show nats-3 down and the others leading",
            || async {
                let status = stack.run(&["status"]).await.ok()?;
                let shown = text(&status.stdout);
                let node = |name: &str, state: &str| {
                    shown
                        .lines()
                        .any(|l| l.starts_with(&format!("nats {name}")) && l.contains(state))
                };
                let ingress_led = shown
                    .lines()
                    .any(|l| l.starts_with("nats nats-") && l.contains(" MESH_INGRESS"));
                (node("nats-3", " down ")
                    && node("nats-1", " up ")
                    && node("nats-2", " up ")
                    && ingress_led)
                    .then_some(shown)
            },
        )
        .await?;
        println!("{shown}");
        anyhow::Ok(())
    };
    let down = stack.down_after(checks).await?;
    let out = text(&down.stdout);
    assert!(down.status.success(), "{out}");
    assert!(
        out.contains("nats-server        stopped")
            && out.contains("nats-server-2      stopped")
            && out.contains("nats-server-3      gone"),
        "{out}"
    );
    Ok(())
}

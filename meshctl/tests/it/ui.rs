//! `meshctl ui` in a real browser: headless Chromium, driven through
//! chromedriver's WebDriver API, against a real policy worker, audit sink,
//! nats-server and clickhouse-server after `meshctl demo` — the trace list,
//! the decision tree with its denial, the `decision=deny` filter, a step
//! that appears while the page is open; and, over plain HTTP, the pages for
//! bad input and for a ClickHouse that does not answer, and escaping.
//!
//! Screenshots of the two main pages go to `$AGENTMESH_UI_SCREENSHOTS`
//! (relative to the workspace) when set: `AGENTMESH_UI_SCREENSHOTS=docs`
//! makes the ones docs/ui.md and the README show.

use crate::support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::services::{Services, workspace};
use support::webdriver::{Driver, Session, http};
use testkit::{NatsServer, Service, WAIT, eventually, free_port};

/// The test's mesh and the environment that points `meshctl` at it.
struct Stack {
    services: Services,
    env: Vec<(String, String)>,
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let services = Services::start("ui").await?;
        let env = vec![
            ("NATS_URL".to_owned(), services.nats.url()),
            ("CLICKHOUSE_URL".to_owned(), services.ch().url()),
            (
                "AGENTMESH_AUDIT_DATABASE".to_owned(),
                services.db().to_owned(),
            ),
            (
                "AGENTMESH_HOME".to_owned(),
                services.tmp.path().join("home").display().to_string(),
            ),
        ];
        Ok(Self { services, env })
    }
}

fn meshctl_command(env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args).current_dir(workspace());
    for var in [
        "NATS_URL",
        "CLICKHOUSE_URL",
        "AGENTMESH_AUDIT_DATABASE",
        "AGENTMESH_HOME",
        "CLICKHOUSE_USER",
        "CLICKHOUSE_PASSWORD",
        "NATS_NKEY_SEED_FILE",
        "NATS_CREDS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// `meshctl demo`; returns its trace id.
async fn run_demo(env: &[(String, String)]) -> anyhow::Result<String> {
    let mut cmd = meshctl_command(env, &["demo", "--timeout-secs", "60"]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "meshctl demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Again: meshctl trace "))
        .map(|t| t.trim().to_owned())
        .ok_or_else(|| anyhow::anyhow!("demo names no trace:\n{stdout}"))
}

/// `meshctl ui` on a free port, once it answers; returns it and its URL.
async fn start_ui(env: &[(String, String)]) -> anyhow::Result<(Service, String)> {
    let port = free_port()?.to_string();
    let mut ui = Service::spawn(&mut meshctl_command(env, &["ui", "--port", &port]))?;
    let url = format!("http://127.0.0.1:{port}");
    let style = format!("{url}/assets/style.css");
    ui.wait_until(WAIT, "meshctl ui to answer", || {
        let style = style.clone();
        async move { matches!(http("GET", &style, None).await, Ok((200, _))).then_some(()) }
    })
    .await?;
    Ok((ui, url))
}

/// Publishes one binary-mode event on `mesh.ingress.<agent>.<step>`.
async fn publish(
    nats: &NatsServer,
    agent: &str,
    step: &str,
    attributes: &[(&str, &str)],
    data: &str,
) -> anyhow::Result<()> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-source", format!("/agents/{agent}").as_str());
    for (name, value) in attributes {
        headers.insert(format!("ce-{name}").as_str(), *value);
    }
    let js = async_nats::jetstream::new(nats.connect().await?);
    js.publish_with_headers(
        format!("mesh.ingress.{agent}.{step}"),
        headers,
        data.to_owned().into(),
    )
    .await?
    .await?;
    Ok(())
}

/// The UI's state of a trace once it has `steps` steps, all decided.
async fn wait_for_steps(ui: &str, trace_id: &str, steps: u64) -> anyhow::Result<Value> {
    let api = format!("{ui}/api/trace/{trace_id}");
    eventually(
        WAIT,
        &format!("{steps} decided steps of {trace_id}"),
        || async {
            let (status, body) = http("GET", &api, None).await.ok()?;
            let state: Value = serde_json::from_str(&body).ok()?;
            (status == 200 && state["steps"] == steps && state["decided"] == steps).then_some(state)
        },
    )
    .await
}

/// Polls `script` in the page until it returns `expected`.
async fn until_page(
    session: &Session,
    what: &str,
    script: &str,
    expected: Value,
) -> anyhow::Result<()> {
    let found = eventually(WAIT, what, || async {
        let value = session.run(script, json!([])).await.ok()?;
        (value == expected).then_some(())
    })
    .await;
    if let Err(e) = found {
        let last = session.run(script, json!([])).await;
        anyhow::bail!("{e}; the page gives {last:?}, expected {expected}");
    }
    Ok(())
}

fn screenshot_path(name: &str) -> Option<PathBuf> {
    // Relative to the workspace: `AGENTMESH_UI_SCREENSHOTS=docs` updates docs/.
    std::env::var_os("AGENTMESH_UI_SCREENSHOTS").map(|dir| workspace().join(dir).join(name))
}

#[tokio::test]
async fn the_ui_in_a_real_browser_shows_traces_trees_denials_and_live_steps() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    // A workflow without denials, for the filter to leave out.
    let planner = agents_sdk::Agent::connect("planner", stack.services.nats.url()).await?;
    let quiet = planner.workflow();
    let handoff = quiet.handoff("coder", "an allowed task").await?;
    planner.await_decision(&handoff.id).await?;
    let quiet_trace = quiet.trace_id();
    drop(planner);

    let trace_id = run_demo(&stack.env).await?;
    let (_ui, ui) = start_ui(&stack.env).await?;
    wait_for_steps(&ui, &trace_id, 11).await?;
    wait_for_steps(&ui, &quiet_trace, 1).await?;

    let driver = Driver::start().await?;
    let session = driver.session().await?;
    let checks = async {
        trace_list(&session, &ui, &trace_id, &quiet_trace).await?;
        denied_only(&session, &ui, &trace_id, &quiet_trace).await?;
        tree_page(&session, &ui, &trace_id).await?;
        live_step(&session, &stack, &ui, &trace_id).await?;
        escaped(&session, &stack, &ui).await?;
        anyhow::Ok(())
    };
    let result = checks.await;
    session.quit().await?;
    result?;
    bad_input(&ui).await?;
    stack.services.stop().await
}

/// The list shows both traces; the demo's with its agents, 11 steps and 1 denial.
async fn trace_list(session: &Session, ui: &str, demo: &str, quiet: &str) -> anyhow::Result<()> {
    session.goto(&format!("{ui}/")).await?;
    let rows = session
        .run(
            "return [...document.querySelectorAll('tr.trace')].map(r => [r.dataset.trace, \
             r.querySelector('.agents').innerText, r.querySelector('.steps').innerText, \
             r.querySelector('.denied').innerText, r.className])",
            json!([]),
        )
        .await?;
    let row = |id: &str| {
        rows.as_array()
            .and_then(|r| r.iter().find(|r| r[0] == id))
            .cloned()
    };
    assert_eq!(
        row(demo),
        Some(json!([
            demo,
            "coder planner reviewer",
            "11",
            "1",
            "trace denied"
        ])),
        "{rows}"
    );
    assert_eq!(row(quiet).map(|r| r[3].clone()), Some(json!("0")), "{rows}");
    if let Some(path) = screenshot_path("ui-traces.png") {
        session.screenshot(&path).await?;
    }
    Ok(())
}

/// Choosing `deny` in the form lists only traces with a denial.
async fn denied_only(session: &Session, ui: &str, demo: &str, quiet: &str) -> anyhow::Result<()> {
    session
        .run(
            "document.querySelector('select[name=decision]').value = 'deny'",
            json!([]),
        )
        .await?;
    session.click("form.filters button[type=submit]").await?;
    // The click submits the form; the browser may still be on the old page
    // when the click returns, so wait until the filtered one has loaded.
    let url = eventually(WAIT, "the page filtered by decision=deny", || async {
        let url = session.url().await.ok()?;
        let ready = session
            .run("return document.readyState", json!([]))
            .await
            .ok()?;
        (url.contains("decision=deny") && ready == "complete").then_some(url)
    })
    .await?;
    assert!(url.starts_with(&format!("{ui}/?")), "{url}");
    let rows = session
        .run(
            "return [...document.querySelectorAll('tr.trace')].map(r => [r.dataset.trace, \
             r.querySelector('.denied').innerText])",
            json!([]),
        )
        .await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    assert!(rows.iter().any(|r| r[0] == demo), "{rows:?}");
    assert!(!rows.iter().any(|r| r[0] == quiet), "{rows:?}");
    assert!(rows.iter().all(|r| r[1] != "0"), "{rows:?}");
    Ok(())
}

/// The tree: 11 steps by causation, the shell.exec denial highlighted with
/// its policies, and its receipt on click.
async fn tree_page(session: &Session, ui: &str, demo: &str) -> anyhow::Result<()> {
    session.goto(&format!("{ui}/trace/{demo}")).await?;
    let steps = session
        .run(
            "return document.querySelectorAll('li.step').length",
            json!([]),
        )
        .await?;
    assert_eq!(steps, 11);
    // The two tool calls hang off the coder's reasoning, four levels down.
    let depth = session
        .run(
            "return [...document.querySelectorAll('li.step')].map(li => { let d = 0, e = li; \
             while ((e = e.parentElement.closest('li.step'))) d++; \
             return li.querySelector('summary .type').innerText + ':' + d; })",
            json!([]),
        )
        .await?;
    assert_eq!(
        depth,
        json!([
            "prompt:0",
            "reasoning:1",
            "task.handoff:2",
            "reasoning:3",
            "tool.call:4",
            "tool.result:5",
            "memory.update:6",
            "task.handoff:7",
            "reasoning:8",
            "output:9",
            "tool.call:4"
        ])
    );
    let denied = session
        .run(
            "const s = [...document.querySelectorAll('li.step.deny > details > summary')]; \
             return s.map(e => [e.innerText, getComputedStyle(e).backgroundColor])",
            json!([]),
        )
        .await?;
    assert_eq!(
        denied,
        json!([[
            "coder tool.call shell.exec DENY by forbid-high-risk-tools, forbid-shell-exec",
            "rgb(253, 231, 228)"
        ]])
    );
    session.click("li.step.deny > details > summary").await?;
    let receipt = session
        .run(
            "const d = document.querySelector('li.step.deny > details'); \
             return [d.open, JSON.parse(d.querySelector('pre.receipt').innerText)]",
            json!([]),
        )
        .await?;
    assert_eq!(receipt[0], true);
    assert_eq!(receipt[1]["decision"], "deny", "{receipt}");
    assert_eq!(receipt[1]["subject"], "shell.exec", "{receipt}");
    if let Some(path) = screenshot_path("ui-trace.png") {
        session.screenshot(&path).await?;
    }
    Ok(())
}

/// A step published while the page is open appears in it, without reload.
async fn live_step(session: &Session, stack: &Stack, ui: &str, demo: &str) -> anyhow::Result<()> {
    let root = session
        .run(
            "window.__samePage = 'yes'; return document.querySelector('ul.tree > li.step').dataset.event",
            json!([]),
        )
        .await?;
    let root = root.as_str().unwrap_or_default().to_owned();
    let traceparent = format!("00-{demo}-00f067aa0ba902b7-01");
    let id = uuid::Uuid::now_v7().to_string();
    publish(
        &stack.services.nats,
        "planner",
        "reasoning",
        &[
            ("id", &id),
            ("type", "io.agentmesh.reasoning"),
            ("traceparent", &traceparent),
            ("causationid", &root),
            ("causationsource", "/agents/planner"),
            ("datacontenttype", "application/json"),
        ],
        r#"{"thought":"a second look, while the page is open"}"#,
    )
    .await?;
    until_page(
        session,
        "the new step in the open page",
        &format!(
            "return [document.querySelectorAll('li.step').length, window.__samePage, \
             !!document.querySelector('li.step[data-event=\"{id}\"].allow'), \
             document.getElementById('step-count').innerText]"
        ),
        json!([12, "yes", true, "12 steps"]),
    )
    .await?;
    // The receipt stays open across the update.
    let open = session
        .run(
            "return document.querySelector('li.step.deny > details').open",
            json!([]),
        )
        .await?;
    assert_eq!(open, true);
    let _ = ui;
    Ok(())
}

/// `<script>` in a subject and in data shows as text and never runs.
async fn escaped(session: &Session, stack: &Stack, ui: &str) -> anyhow::Result<()> {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let subject = "<script>window.__xss=1</script>";
    let data = "<script>window.__xss=2</script><img src=x onerror=\"window.__xss=3\">";
    publish(
        &stack.services.nats,
        "planner",
        "reasoning",
        &[
            ("id", &uuid::Uuid::now_v7().to_string()),
            ("type", "io.agentmesh.reasoning"),
            ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
            ("subject", subject),
            ("datacontenttype", "text/plain"),
        ],
        data,
    )
    .await?;
    wait_for_steps(ui, &trace, 1).await?;
    let (status, html) = http("GET", &format!("{ui}/trace/{trace}"), None).await?;
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("&lt;script&gt;window.__xss=1&lt;/script&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script>window"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    session.goto(&format!("{ui}/trace/{trace}")).await?;
    session.click("li.step > details > summary").await?;
    let shown = session
        .run(
            "return [typeof window.__xss, document.querySelector('summary .subject').innerText, \
             document.querySelector('pre.data').innerText, document.querySelectorAll('main script, main img').length]",
            json!([]),
        )
        .await?;
    assert_eq!(shown, json!(["undefined", subject, data, 0]));
    Ok(())
}

/// Bad input gets a clear page and status: 400 for a malformed trace id or
/// filter, 404 for an unknown trace or page, 405 for a write.
async fn bad_input(ui: &str) -> anyhow::Result<()> {
    for (path, status, says) in [
        (
            "/trace/0123456789abcdef0123456789abcdef",
            404,
            "no steps of trace 0123456789abcdef0123456789abcdef",
        ),
        (
            "/api/trace/0123456789abcdef0123456789abcdef",
            404,
            "no steps of trace",
        ),
        ("/trace/not-a-trace", 400, "is not a trace id"),
        ("/trace/%3Cscript%3E", 400, "is not a trace id"),
        (
            "/?decision=maybe",
            400,
            "decision `maybe` is not one of allow, deny, invalid, pending",
        ),
        ("/?since=yesterday", 400, "since `yesterday` is not a time"),
        ("/?since=99999999999999999d", 400, "is not a time"),
        (
            "/?agent=%3Cscript%3E",
            400,
            "agent `&lt;script&gt;` is not an agent id",
        ),
        ("/?limit=many", 400, "limit `many`"),
        ("/?colour=red", 400, "unknown filter `colour`"),
        ("/denials?since=2h&until=3h", 400, "the range is empty"),
        ("/nothing-here", 404, "no page at `/nothing-here`"),
    ] {
        let (got, body) = http("GET", &format!("{ui}{path}"), None).await?;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
        if !path.starts_with("/api/") {
            assert!(body.contains(&format!("<h1>{status} ")), "{path}: {body}");
        }
    }
    let (got, _) = http("POST", &format!("{ui}/"), None).await?;
    assert_eq!(got, 405);
    let (got, body) = http("GET", &format!("{ui}/denials?agent=coder"), None).await?;
    assert_eq!(got, 200);
    assert!(
        body.contains("forbid-shell-exec") && body.contains("forbid-high-risk-tools"),
        "{body}"
    );
    Ok(())
}

/// With nothing answering at the ClickHouse URL every page that reads the
/// audit is a 503 that says so; the UI itself keeps serving.
#[tokio::test]
async fn pages_say_503_when_clickhouse_does_not_answer() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let env = vec![
        ("CLICKHOUSE_URL".to_owned(), nowhere.clone()),
        (
            "AGENTMESH_HOME".to_owned(),
            tmp.path().display().to_string(),
        ),
    ];
    let (_ui, ui) = start_ui(&env).await?;
    for path in [
        "/",
        "/denials",
        "/trace/0123456789abcdef0123456789abcdef",
        "/api/trace/0123456789abcdef0123456789abcdef",
    ] {
        let (status, body) = http("GET", &format!("{ui}{path}"), None).await?;
        assert_eq!(status, 503, "{path}: {body}");
        assert!(
            body.contains(&format!("ClickHouse at {nowhere} does not answer")),
            "{path}: {body}"
        );
    }
    let (status, _) = http("GET", &format!("{ui}/?decision=maybe"), None).await?;
    assert_eq!(status, 400, "input is checked before ClickHouse is asked");
    Ok(())
}

//! Shared harness for the audit sink's integration tests: a fresh NATS and
//! ClickHouse server, a database of the test's own, the sink (in-process or
//! as the real binary) and builders for the messages it consumes.
#![allow(
    dead_code,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails; shared by several test modules, each using a part of it"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use async_nats::HeaderMap;
use audit_sink::Config;
use bytes::Bytes;
use schemas::{
    Decision, DecisionReceipt, EventBuilder, EventBuilderV10, TraceParent, encode_binary, subjects,
};
use serde_json::json;
use testkit::{Mesh, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) use testkit::WAIT;

/// `testkit`'s mesh with ClickHouse (through `Deref`: `nats`, `js`, `ch()`,
/// `db()`), a directory of the test's own, and the sink in-process or as
/// its binary.
pub(crate) struct Harness {
    mesh: Mesh,
    pub tmp: tempfile::TempDir,
}

impl std::ops::Deref for Harness {
    type Target = Mesh;

    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut Mesh {
        &mut self.mesh
    }
}

impl Harness {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        Ok(Self {
            mesh: Mesh::with_clickhouse("audit").await?,
            tmp: tempfile::tempdir()?,
        })
    }

    /// The sink's config for this harness, tuned for quick tests.
    pub(crate) fn config(&self) -> Config {
        let mut config = Config::new(self.nats.url(), self.ch().url());
        config.database = self.db().to_owned();
        config.batch_period_ms = 100;
        config.retry_max_ms = 300;
        config.ack_wait_ms = 3_000;
        config.insert_timeout_ms = 5_000;
        config
    }

    /// A fresh path for a ready file.
    fn ready_path(&self) -> PathBuf {
        self.tmp
            .path()
            .join(format!("ready-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Runs the sink in-process until the returned token is cancelled, and
    /// waits until it is ready.
    pub(crate) async fn spawn_sink(&self, config: Config) -> anyhow::Result<Sink> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("audit_sink=info")),
            )
            .with_test_writer()
            .try_init();
        let ready = self.ready_path();
        let config = Config {
            ready_file: Some(ready.clone()),
            ..config
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(audit_sink::run(config, shutdown.clone()));
        eventually(WAIT, "the audit sink's ready file", || {
            let ready = ready.clone();
            async move { ready.exists().then_some(()) }
        })
        .await?;
        Ok(Sink { shutdown, task })
    }

    /// Starts the real `audit-sink` binary and waits until it is ready.
    pub(crate) async fn spawn_binary(&self, config: &Config) -> anyhow::Result<Child> {
        let ready = self.ready_path();
        let child = Command::new(env!("CARGO_BIN_EXE_audit-sink"))
            .args(["--nats-url", &config.nats.url])
            .args(["--clickhouse-url", &config.clickhouse_url])
            .args(["--database", &config.database])
            .args(["--batch-period-ms", &config.batch_period_ms.to_string()])
            .args(["--retry-max-ms", &config.retry_max_ms.to_string()])
            .args(["--ack-wait-ms", &config.ack_wait_ms.to_string()])
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting audit-sink")?;
        eventually(WAIT, "the audit-sink binary's ready file", || {
            let ready: PathBuf = ready.clone();
            async move { ready.exists().then_some(()) }
        })
        .await?;
        Ok(child)
    }

    pub(crate) async fn publish(&self, message: &Message) -> anyhow::Result<()> {
        let ack = match &message.headers {
            Some(h) => {
                self.js
                    .publish_with_headers(
                        message.subject.clone(),
                        h.clone(),
                        message.payload.clone(),
                    )
                    .await?
            }
            None => {
                self.js
                    .publish(message.subject.clone(), message.payload.clone())
                    .await?
            }
        };
        ack.await.context("JetStream did not store the message")?;
        Ok(())
    }

    /// TabSeparated result of `sql` in the test database.
    pub(crate) async fn query(&self, sql: &str) -> anyhow::Result<String> {
        let client = self.ch().client().with_database(self.db());
        testkit::clickhouse::query_text(&client, sql).await
    }

    /// Renders and runs a shipped query with `params`, as TSV lines.
    pub(crate) async fn shipped(
        &self,
        query: audit_sink::queries::Query,
        params: &[(&str, &str)],
    ) -> anyhow::Result<Vec<String>> {
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sql = audit_sink::queries::render(query.sql, &params)?;
        Ok(self.query(&sql).await?.lines().map(str::to_owned).collect())
    }

    /// Where the sink serves `/metrics` when started with [`Harness::with_metrics`].
    pub(crate) fn metrics_addr(config: &Config) -> Option<std::net::SocketAddr> {
        config
            .ops
            .http_port
            .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// `config` with the health and metrics server on a free local port.
    pub(crate) fn with_metrics(mut config: Config) -> anyhow::Result<Config> {
        config.ops.http_port = Some(testkit::free_port()?);
        config.ops.http_host = std::net::IpAddr::from([127, 0, 0, 1]);
        Ok(config)
    }

    /// `SELECT count() FROM <table> FINAL`.
    pub(crate) async fn count_final(&self, table: &str) -> anyhow::Result<u64> {
        Ok(self
            .query(&format!("SELECT count() FROM {table} FINAL"))
            .await?
            .trim()
            .parse()?)
    }

    /// Waits until `table` holds at least `rows` rows, duplicates counted.
    pub(crate) async fn wait_raw_rows(&self, table: &str, rows: u64) -> anyhow::Result<()> {
        let sql = format!("SELECT count() FROM {table}");
        eventually(WAIT, &format!("{rows} raw rows in `{table}`"), || async {
            let n: u64 = self.query(&sql).await.ok()?.trim().parse().ok()?;
            (n >= rows).then_some(())
        })
        .await
    }

    /// Waits until `table` (read with FINAL) holds `rows` rows, or fails.
    pub(crate) async fn wait_rows(&self, table: &str, rows: u64) -> anyhow::Result<()> {
        let last = std::sync::atomic::AtomicU64::new(0);
        let result = eventually(WAIT, &format!("{rows} rows in `{table}`"), || {
            let count = self.count_final(table);
            let last = &last;
            async move {
                let n = count.await.ok()?;
                last.store(n, std::sync::atomic::Ordering::Relaxed);
                (n >= rows).then_some(())
            }
        })
        .await;
        let last = last.load(std::sync::atomic::Ordering::Relaxed);
        result.with_context(|| format!("`{table}` holds {last} rows"))
    }
}

pub(crate) struct Sink {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), audit_sink::Error>>,
}

impl Sink {
    /// Graceful stop: cancels and waits for `run` to return.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task).await???;
        Ok(())
    }
}

/// A NATS message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

/// One step of a workflow, as an agent publishes it.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub id: String,
    pub agent: &'static str,
    pub step: &'static str,
    pub ty: &'static str,
    pub parent: Option<String>,
    /// The parent's agent, sent as `causationsource`.
    pub parent_agent: Option<&'static str>,
    pub target: Option<&'static str>,
    pub tool: Option<&'static str>,
    pub time: String,
}

impl Step {
    pub(crate) fn message(&self, trace: &TraceParent) -> Message {
        let mut b = EventBuilderV10::new()
            .id(self.id.clone())
            .source(format!("/agents/{}", self.agent))
            .ty(self.ty)
            .time(self.time.clone())
            .extension("traceparent", trace.child().to_string())
            .data(
                "application/json",
                json!({"step": self.step, "id": self.id}),
            );
        if let Some(p) = &self.parent {
            b = b.extension("causationid", p.clone());
        }
        if let Some(a) = self.parent_agent {
            b = b.extension("causationsource", format!("/agents/{a}"));
        }
        if let Some(t) = self.target {
            b = b.extension("target", t);
        }
        if let Some(tool) = self.tool {
            b = b.subject(tool);
        }
        let event = b.build().expect("valid test event");
        let (headers, payload) = encode_binary(&event);
        Message {
            subject: subjects::ingress(self.agent, self.step),
            headers: Some(headers),
            payload,
        }
    }

    /// The receipt a policy worker would publish for this step.
    pub(crate) fn receipt(
        &self,
        trace: &TraceParent,
        decision: Decision,
        reasons: &[&str],
        eval_micros: u64,
    ) -> Message {
        let receipt = DecisionReceipt {
            event_id: self.id.clone(),
            trace_id: trace.trace_id_hex(),
            decision,
            reasons: reasons.iter().map(|s| s.to_string()).collect(),
            errors: Vec::new(),
            policy_hash: "test-policy-hash".into(),
            decision_id: format!("d-{}", self.id),
            agent: self.agent.into(),
            event_type: self.ty.into(),
            target: self.target.map(str::to_owned),
            subject: self.tool.map(str::to_owned),
            causation_id: self.parent.clone(),
            causation_agent: self.parent_agent.map(str::to_owned),
            trace_derived: false,
            decided_at: self.time.clone(),
            eval_micros,
            ingress_subject: subjects::ingress(self.agent, self.step),
            ..Default::default()
        };
        Message {
            subject: subjects::decision(self.agent),
            headers: None,
            payload: Bytes::from(serde_json::to_vec(&receipt).expect("receipt serialises")),
        }
    }
}

/// `2026-03-01T10:00:<secs>Z` plus `offset` seconds.
pub(crate) fn at(offset: u32) -> String {
    let t = chrono::DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z").expect("valid")
        + chrono::Duration::seconds(i64::from(offset));
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A plain workflow of `n` steps, each caused by the one before (a chain),
/// tool calls to `fs.read` every third step.
pub(crate) fn chain(prefix: &str, n: usize) -> Vec<Step> {
    let agents = ["planner", "coder", "reviewer"];
    (0..n)
        .map(|i| {
            let tool = i % 3 == 1;
            Step {
                id: format!("{prefix}-{i:05}"),
                agent: agents[i % 3],
                step: if tool { "tool_call" } else { "reasoning" },
                ty: if tool {
                    "io.agentmesh.tool.call"
                } else {
                    "io.agentmesh.reasoning"
                },
                parent: (i > 0).then(|| format!("{prefix}-{:05}", i - 1)),
                parent_agent: None,
                target: None,
                tool: tool.then_some("fs.read"),
                time: at(u32::try_from(i).unwrap_or(0) % 3600),
            }
        })
        .collect()
}
